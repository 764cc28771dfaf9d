//! Capability probe: ask the store what it really does instead of assuming.
//!
//! S3-compatible servers differ in exactly the features our safety rests on.
//! Garage, for one, accepts `If-None-Match: *` and `If-Match` and ignores them
//! (a second create overwrites). The probe writes a few small objects under
//! `{prefix}/_probe/{random}/`, records what the store answered, and deletes
//! them again. Every answer that is not the documented one is recorded as
//! "not supported" with a note: the probe never assumes a feature.
//!
//! Callers feed `conditional_create` into `UploadConfig::trust_conditional_create`
//! and must refuse (or loudly warn about) fencing when `conditional_update`
//! is false.

use bytes::Bytes;
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, GetOptions, GetRange, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    UpdateVersion,
};
use serde::Serialize;

use crate::error::Result;
use crate::remote::s3_uploads::PayloadSigning;
use crate::remote::{RemoteStore, classify};

/// What a store answered to the probe.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// A second `PutMode::Create` on the same key failed with AlreadyExists.
    pub conditional_create: bool,
    /// `PutMode::Update` honours If-Match both ways: a stale e-tag fails
    /// with Precondition and leaves the object as it was, the current
    /// e-tag succeeds and writes the new bytes, and that e-tag, stale
    /// after the update, fails again.
    pub conditional_update: bool,
    /// A `MultipartStore` exists and create/put_part/complete produced the
    /// exact bytes.
    pub multipart: bool,
    /// A bounded range GET returned exactly the requested bytes.
    pub range_get: bool,
    /// User metadata put with an object comes back from a HEAD.
    pub metadata: bool,
    /// The server validates `x-amz-checksum-crc64nvme` end to end: a PUT
    /// and an UploadPart with a deliberately wrong value are rejected (and
    /// the rejected PUT leaves nothing under its key), and a HEAD with
    /// checksum mode returns the right whole-object CRC-64/NVME after a
    /// single PUT and after a multipart upload. Only then is the `Checksum`
    /// verification level used; otherwise uploads are read back (`Full`).
    pub checksum_validated: bool,
    /// The parts of `checksum_validated`, for `store-check`.
    pub checksum: ChecksumProbe,
    /// What was surprising, in words, for `status` output and logs.
    pub notes: Vec<String>,
}

/// What the store did with S3 CRC-64/NVME checksums (all `false` on stores
/// that are not S3).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChecksumProbe {
    /// A PUT with a wrong `x-amz-checksum-crc64nvme` was rejected (4xx).
    pub put_rejects_wrong: bool,
    /// ... and left no object under its key.
    pub put_rejected_leaves_nothing: bool,
    /// An UploadPart with a wrong value was rejected (4xx).
    pub upload_part_rejects_wrong: bool,
    /// HEAD (checksum mode) of a single PUT returned the right value.
    pub head_single: bool,
    /// HEAD (checksum mode) of a multipart upload returned the right
    /// whole-object value (not a composite `-N` one).
    pub head_multipart: bool,
    /// With the body left out of the signature (`UNSIGNED-PAYLOAD`), a
    /// PUT and an UploadPart with the right value were accepted and with a
    /// wrong one rejected (400, nothing left under the key). Asked only
    /// where the store has an unsigned-payload client (HTTPS or loopback,
    /// `StoreOptions::sign_payload` off) and the signed answers all held;
    /// only then do segment bodies skip payload signing. Not part of
    /// [`all`](Self::all): a server that refuses unsigned bodies still
    /// validates signed ones.
    pub unsigned_payload_validated: bool,
}

impl ChecksumProbe {
    /// Every part proven.
    pub fn all(&self) -> bool {
        self.put_rejects_wrong
            && self.put_rejected_leaves_nothing
            && self.upload_part_rejects_wrong
            && self.head_single
            && self.head_multipart
    }
}

const PROBE_DIR: &str = "_probe";

/// Runs the probe. Errors only when the store cannot be used at all (the
/// first plain write fails, e.g. bad credentials); a feature that misbehaves
/// is reported as `false` with a note instead.
pub async fn probe(store: &RemoteStore) -> Result<Capabilities> {
    let dir = store
        .prefix()
        .clone()
        .join(PROBE_DIR)
        .join(format!("{:016x}", fastrand::u64(..)));
    let mut caps = Capabilities::default();
    let result = run(store, &dir, &mut caps).await;
    cleanup(store, &dir, &mut caps).await;
    // Notes quote the store's errors as they came (a server may echo a
    // credential in them); they are printed by `drain` and `store-check`.
    for n in &mut caps.notes {
        *n = crate::error::scrub(n);
    }
    result.map(|()| caps)
}

/// How long one probe's answer serves other opens of the same store in
/// this process: a broker opening its partitions at start-up probes once,
/// not once per partition; a store reconfigured under the same URL is seen
/// again within this long.
pub const SHARED_FOR: std::time::Duration = std::time::Duration::from_secs(300);

/// At most this many stores' answers are kept (expired ones go first).
const SHARED_MAX: usize = 1024;

type Shared = std::collections::HashMap<u64, (std::time::Instant, Capabilities)>;

fn shared() -> &'static std::sync::Mutex<Shared> {
    static SHARED: std::sync::OnceLock<std::sync::Mutex<Shared>> = std::sync::OnceLock::new();
    SHARED.get_or_init(Default::default)
}

/// [`probe`], sharing a successful answer that proved conditional creates
/// for [`SHARED_FOR`] with every later call on a store built from the same
/// URL, options and `AWS_*` variables in this process. A failed probe, or
/// one that did not prove conditional creates, is not kept (the next open
/// probes again); stores without a key (built from parts, `memory://`) are
/// always probed. Calls that start before the first answer is kept each
/// probe.
pub async fn probe_shared(store: &RemoteStore) -> Result<Capabilities> {
    let Some(key) = store.probe_key() else {
        return probe(store).await;
    };
    let now = std::time::Instant::now();
    if let Some((at, caps)) = shared()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        && now.duration_since(*at) < SHARED_FOR
    {
        return Ok(caps.clone());
    }
    let caps = probe(store).await?;
    // Only an answer that proved conditional creates is shared: a probe
    // never assumes a feature, so a proven one was answered as documented,
    // while a missing one may be a throttled or failed request (refusing
    // the manifest, or running it unfenced, for every stream opened next).
    if !caps.conditional_create {
        return Ok(caps);
    }
    let mut m = shared().lock().unwrap_or_else(|p| p.into_inner());
    if m.len() >= SHARED_MAX {
        m.retain(|_, (at, _)| now.duration_since(*at) < SHARED_FOR);
        if m.len() >= SHARED_MAX {
            m.clear();
        }
    }
    m.insert(key, (now, caps.clone()));
    Ok(caps)
}

/// Step 2 of the probe on `key` (an existing object): `Ok` only when the
/// store honours If-Match both ways; else the note that says why not.
async fn conditional_update(
    os: &std::sync::Arc<dyn object_store::ObjectStore>,
    key: &Path,
) -> std::result::Result<(), String> {
    let update = |e_tag: Option<String>| PutOptions {
        mode: PutMode::Update(UpdateVersion {
            e_tag,
            version: None,
        }),
        ..Default::default()
    };
    let body = |what: &'static str| async move {
        match os.get(key).await {
            Ok(g) => g
                .bytes()
                .await
                .map_err(|e| format!("conditional update not checked: GET after {what}: {e}")),
            Err(e) => Err(format!(
                "conditional update not checked: GET after {what}: {e}"
            )),
        }
    };
    let before = body("the creates").await?;
    match os
        .put_opts(
            key,
            PutPayload::from_static(b"stale"),
            update(Some("\"tierindex-stale-etag\"".into())),
        )
        .await
    {
        Err(object_store::Error::Precondition { .. }) => {}
        Ok(_) => {
            return Err(
                "an update with a stale e-tag succeeded: If-Match is ignored, no \
                        compare-and-swap (fencing impossible on this store)"
                    .into(),
            );
        }
        Err(e) => return Err(format!("conditional update not available: {e}")),
    }
    if body("a refused update").await? != before {
        return Err(
            "an update with a stale e-tag was refused but changed the object: If-Match is \
             not honoured"
                .into(),
        );
    }
    let current = match os.head(key).await {
        Ok(m) => m.e_tag,
        Err(e) => {
            return Err(format!(
                "conditional update not checked: HEAD for the e-tag: {e}"
            ));
        }
    };
    let Some(current) = current else {
        return Err("the store returns no e-tag: conditional update impossible".into());
    };
    match os
        .put_opts(
            key,
            PutPayload::from_static(b"updated"),
            update(Some(current.clone())),
        )
        .await
    {
        Ok(_) => {}
        Err(object_store::Error::Precondition { .. }) => {
            return Err(
                "an update with the CURRENT e-tag was refused (412), like a stale one: \
                 If-Match is not honoured as S3 defines it (Ceph RGW 16.2 matches only an \
                 unquoted e-tag), so no compare-and-swap"
                    .into(),
            );
        }
        Err(e) => return Err(format!("conditional update not available: {e}")),
    }
    if &body("the update").await?[..] != b"updated" {
        return Err(
            "an update with the current e-tag succeeded but the object does not hold its \
             bytes: If-Match is not honoured"
                .into(),
        );
    }
    match os
        .put_opts(key, PutPayload::from_static(b"late"), update(Some(current)))
        .await
    {
        Err(object_store::Error::Precondition { .. }) => Ok(()),
        Ok(_) => Err(
            "a second update with the same e-tag succeeded after the first changed the \
             object: If-Match is ignored, no compare-and-swap"
                .into(),
        ),
        Err(e) => Err(format!("conditional update not available: {e}")),
    }
}

async fn run(store: &RemoteStore, dir: &Path, caps: &mut Capabilities) -> Result<()> {
    let os = store.object_store();
    let create = |mode: PutMode| PutOptions {
        mode,
        ..Default::default()
    };

    // 1. Conditional create: the first must succeed (else the store is
    //    unusable and we say so), the second must be AlreadyExists.
    let key = dir.clone().join("create");
    os.put_opts(
        &key,
        PutPayload::from_static(b"first"),
        create(PutMode::Create),
    )
    .await
    .map_err(classify)?;
    match os
        .put_opts(
            &key,
            PutPayload::from_static(b"second"),
            create(PutMode::Create),
        )
        .await
    {
        Err(object_store::Error::AlreadyExists { .. }) => caps.conditional_create = true,
        Ok(_) => caps.notes.push(
            "a second create on an existing key succeeded: If-None-Match is ignored, \
             creates may silently overwrite"
                .into(),
        ),
        Err(e) => caps.notes.push(format!(
            "second create answered neither AlreadyExists nor OK: {e}"
        )),
    }

    // 2. Conditional update (If-Match). Refusing a stale e-tag proves
    //    nothing alone: Ceph RGW 16.2 refuses every quoted If-Match, the
    //    current one too. So all of: a made-up stale e-tag is refused and
    //    the body is unchanged; an update with the CURRENT e-tag (from a
    //    HEAD) succeeds and the body is the new one; that e-tag, now stale,
    //    is refused again.
    match conditional_update(os, &key).await {
        Ok(()) => caps.conditional_update = true,
        Err(note) => caps.notes.push(note),
    }

    // 3. Range GET of a known body.
    let body: Vec<u8> = (0u8..=255).collect();
    let rkey = dir.clone().join("range");
    os.put_opts(
        &rkey,
        PutPayload::from(Bytes::from(body.clone())),
        PutOptions::default(),
    )
    .await
    .map_err(classify)?;
    let opts = GetOptions::new().with_range(Some(GetRange::Bounded(100..164)));
    match async { os.get_opts(&rkey, opts).await?.bytes().await }.await {
        Ok(got) if got[..] == body[100..164] => caps.range_get = true,
        Ok(got) => caps.notes.push(format!(
            "range GET of 64 bytes returned {} bytes that differ",
            got.len()
        )),
        Err(e) => caps.notes.push(format!("range GET failed: {e}")),
    }

    // 4. User metadata round trip through HEAD.
    let mkey = dir.clone().join("meta");
    let mut attrs = Attributes::new();
    attrs.insert(Attribute::Metadata("tierindex-probe".into()), "1".into());
    let put = PutOptions {
        attributes: attrs,
        ..Default::default()
    };
    match os.put_opts(&mkey, PutPayload::from_static(b"m"), put).await {
        Ok(_) => {
            let head = os.get_opts(&mkey, GetOptions::new().with_head(true)).await;
            match head {
                Ok(r) => {
                    let v = r
                        .attributes
                        .get(&Attribute::Metadata("tierindex-probe".into()))
                        .map(|v| v.to_string());
                    if v.as_deref() == Some("1") {
                        caps.metadata = true;
                    } else {
                        caps.notes
                            .push("object metadata is accepted but not returned by HEAD".into());
                    }
                }
                Err(e) => caps.notes.push(format!("HEAD failed: {e}")),
            }
        }
        Err(e) => caps
            .notes
            .push(format!("object metadata not supported: {e}")),
    }

    // 5. Multipart, one small part (the last part may be below 5 MiB).
    match store.multipart() {
        None => caps
            .notes
            .push("no multipart API: large segments are sent as one PUT".into()),
        Some(mp) => {
            let mkey = dir.clone().join("multipart");
            let data = Bytes::from_static(b"tierindex multipart probe");
            let attempt = async {
                let id = mp.create_multipart(&mkey).await?;
                let done = async {
                    let part = mp
                        .put_part(&mkey, &id, 0, PutPayload::from(data.clone()))
                        .await?;
                    mp.complete_multipart(&mkey, &id, vec![part]).await
                }
                .await;
                if done.is_err() {
                    let _ = mp.abort_multipart(&mkey, &id).await;
                }
                done?;
                os.get(&mkey).await?.bytes().await
            };
            match attempt.await {
                Ok(got) if got == data => caps.multipart = true,
                Ok(_) => caps
                    .notes
                    .push("multipart upload completed with different bytes".into()),
                Err(e) => caps.notes.push(format!("multipart upload failed: {e}")),
            }
        }
    }

    // 6. S3 checksums: validated on PUT and UploadPart, returned by HEAD.
    probe_checksums(store, dir, caps).await;
    caps.checksum_validated = caps.checksum.all();
    // 7. The same validation with the body left out of the signature.
    if caps.checksum_validated && store.has_unsigned_body_client() {
        let mut notes = Vec::new();
        caps.checksum.unsigned_payload_validated =
            probe_unsigned_payload(store, dir, &mut notes).await;
        caps.notes.extend(notes);
    }
    Ok(())
}

/// Step 7: does the server still reject a wrong `x-amz-checksum-crc64nvme`
/// when the signature does not cover the body? Each wrong request has a
/// right control first, so a refusal is about the checksum (a server that
/// refuses `UNSIGNED-PAYLOAD` altogether answers false here, and segment
/// bodies stay signed).
async fn probe_unsigned_payload(store: &RemoteStore, dir: &Path, notes: &mut Vec<String>) -> bool {
    use crate::remote::s3_uploads::PayloadSigning::Unsigned;
    let body = Bytes::from_static(b"tierindex unsigned-payload checksum probe body");
    let right = crate::segment::format::crc64(&body);
    let wrong = right ^ 0x0001_0000_0000_0100;
    let ok = |s: &Result<u16>| matches!(s, Ok(s) if (200..300).contains(s));
    let said = |s: &Result<u16>| match s {
        Ok(code) => format!("HTTP {code}"),
        Err(e) => e.to_string(),
    };
    let ckey = dir.clone().join("unsigned-right");
    let control = store
        .put_with_crc64(&ckey, body.clone(), right, Unsigned)
        .await;
    if !ok(&control) {
        notes.push(format!(
            "a PUT with an unsigned payload and the right checksum answered {}: segment bodies stay signed",
            said(&control)
        ));
        return false;
    }
    let wkey = dir.clone().join("unsigned-wrong");
    match store
        .put_with_crc64(&wkey, body.clone(), wrong, Unsigned)
        .await
    {
        Ok(400) => {}
        other => {
            notes.push(format!(
                "a PUT with an unsigned payload and a wrong checksum answered {}, not 400: segment bodies stay signed",
                said(&other)
            ));
            return false;
        }
    }
    match store.object_store().head(&wkey).await {
        Err(object_store::Error::NotFound { .. }) => {}
        Ok(m) => {
            notes.push(format!(
                "a rejected unsigned-payload PUT left {} bytes under its key: segment bodies stay signed",
                m.size
            ));
            return false;
        }
        Err(e) => {
            notes.push(format!(
                "HEAD after a rejected unsigned-payload PUT failed ({}): segment bodies stay signed",
                classify(e)
            ));
            return false;
        }
    }
    let Some(mp) = store.multipart() else {
        return false;
    };
    let pkey = dir.clone().join("unsigned-part");
    let id = match mp.create_multipart(&pkey).await {
        Ok(id) => id,
        Err(e) => {
            notes.push(format!(
                "unsigned-payload multipart probe failed: {}",
                classify(e)
            ));
            return false;
        }
    };
    let control = store
        .upload_part_with_crc64(&pkey, &id, 2, body.clone(), right, Unsigned)
        .await;
    let proven = if ok(&control) {
        match store
            .upload_part_with_crc64(&pkey, &id, 1, body.clone(), wrong, Unsigned)
            .await
        {
            Ok(400) => true,
            other => {
                notes.push(format!(
                    "an UploadPart with an unsigned payload and a wrong checksum answered {}, not 400: segment bodies stay signed",
                said(&other)
                ));
                false
            }
        }
    } else {
        notes.push(format!(
            "an UploadPart with an unsigned payload and the right checksum answered {}: segment bodies stay signed",
            said(&control)
        ));
        false
    };
    let _ = mp.abort_multipart(&pkey, &id).await;
    proven
}

/// Step 6 of the probe. Every answer that is not the documented one is a
/// `false` with a note; transport errors too (never assumed to work).
async fn probe_checksums(store: &RemoteStore, dir: &Path, caps: &mut Capabilities) {
    if !store.has_s3_checksums() {
        caps.notes.push(
            "not an S3 store: no server-side checksums; uploads are verified by reading them back"
                .into(),
        );
        return;
    }
    let os = store.object_store();
    let body = Bytes::from_static(b"tierindex checksum probe body");
    let right = crate::segment::format::crc64(&body);
    let wrong = right ^ 0x0100_0000_0000_0001;
    let c = &mut caps.checksum;
    let mut notes = Vec::new();

    // Control: the same hand-signed PUT with the right value must be
    // accepted, so a refusal of the wrong one below is about the checksum
    // (not a bucket policy, a signing fault or throttling).
    let ckey = dir.clone().join("checksum-right");
    match store
        .put_with_crc64(&ckey, body.clone(), right, PayloadSigning::Signed)
        .await
    {
        Ok(s) if (200..300).contains(&s) => {}
        Ok(s) => {
            notes.push(format!(
                "a hand-signed PUT with the right x-amz-checksum-crc64nvme answered HTTP {s}: \
                 the checksum answers cannot be proven; uploads are read back"
            ));
            caps.notes.extend(notes);
            return;
        }
        Err(e) => {
            notes.push(format!(
                "checksum control PUT failed ({e}); uploads are read back"
            ));
            caps.notes.extend(notes);
            return;
        }
    }

    // a. A PUT with a wrong checksum must be rejected (400, the answer to a
    //    bad digest; not 403/404/408/429/5xx) and leave nothing.
    let wkey = dir.clone().join("checksum-wrong");
    match store
        .put_with_crc64(&wkey, body.clone(), wrong, PayloadSigning::Signed)
        .await {
        Ok(400) => {
            c.put_rejects_wrong = true;
            match os.head(&wkey).await {
                Err(object_store::Error::NotFound { .. }) => c.put_rejected_leaves_nothing = true,
                Ok(_) => notes.push(
                    "a PUT rejected for its checksum still left its body under the key (such a body is never taken for ours: uploads are read back)"
                        .to_string(),
                ),
                Err(e) => notes.push(format!("HEAD after a rejected PUT failed: {e}")),
            }
        }
        Ok(s) if (200..300).contains(&s) => notes.push(format!(
            "a PUT with a wrong x-amz-checksum-crc64nvme was accepted (HTTP {s}): the server does not validate checksums"
        )),
        Ok(s) => notes.push(format!(
            "a PUT with a wrong x-amz-checksum-crc64nvme answered HTTP {s}, not the 400 of a \
             rejected checksum: validation not proven"
        )),
        Err(e) => notes.push(format!("checksum PUT probe failed: {e}")),
    }

    // b. HEAD with checksum mode after a right single PUT.
    let skey = dir.clone().join("checksum-single");
    match os.put(&skey, PutPayload::from(body.clone())).await {
        Ok(_) => match store.head_checksum(&skey).await {
            Ok(Some(h)) if h.crc64 == Some(right) && h.size == Some(body.len() as u64) => {
                c.head_single = true
            }
            Ok(Some(h)) => notes.push(format!(
                "HEAD with checksum mode after a PUT returned {:?} (size {:?}), not the whole-object CRC64",
                h.raw, h.size
            )),
            Ok(None) => notes.push("HEAD with checksum mode found no object".into()),
            Err(e) => notes.push(format!("HEAD with checksum mode failed: {e}")),
        },
        Err(e) => notes.push(format!("checksum single PUT failed: {e}")),
    }

    // c. A wrong UploadPart is rejected; a right multipart upload has a
    //    whole-object value on HEAD.
    if let Some(mp) = store.multipart() {
        let wkey = dir.clone().join("checksum-part-wrong");
        match mp.create_multipart(&wkey).await {
            Ok(id) => {
                // The same upload takes part 2 with the right value (the
                // control) and part 1 with a wrong one (must be a 400).
                let control = store
                    .upload_part_with_crc64(
                        &wkey,
                        &id,
                        2,
                        body.clone(),
                        right,
                        PayloadSigning::Signed,
                    )
                    .await;
                match control {
                    Ok(s) if (200..300).contains(&s) => match store
                        .upload_part_with_crc64(
                            &wkey,
                            &id,
                            1,
                            body.clone(),
                            wrong,
                            PayloadSigning::Signed,
                        )
                        .await
                    {
                        Ok(400) => c.upload_part_rejects_wrong = true,
                        Ok(s) => notes.push(format!(
                            "an UploadPart with a wrong checksum answered HTTP {s}, not 400"
                        )),
                        Err(e) => notes.push(format!("checksum UploadPart probe failed: {e}")),
                    },
                    Ok(s) => notes.push(format!(
                        "a hand-signed UploadPart with the right checksum answered HTTP {s}: \
                         UploadPart validation cannot be proven"
                    )),
                    Err(e) => notes.push(format!("checksum UploadPart control failed: {e}")),
                }
                let _ = mp.abort_multipart(&wkey, &id).await;
            }
            Err(e) => notes.push(format!("checksum multipart probe failed: {e}")),
        }
        let mkey = dir.clone().join("checksum-multipart");
        let done = async {
            let id = mp.create_multipart(&mkey).await?;
            let r = async {
                let part = mp
                    .put_part(&mkey, &id, 0, PutPayload::from(body.clone()))
                    .await?;
                mp.complete_multipart(&mkey, &id, vec![part]).await
            }
            .await;
            if r.is_err() {
                let _ = mp.abort_multipart(&mkey, &id).await;
            }
            r
        }
        .await;
        match done {
            Ok(_) => match store.head_checksum(&mkey).await {
                Ok(Some(h)) if h.crc64 == Some(right) && h.size == Some(body.len() as u64) => {
                    c.head_multipart = true
                }
                Ok(Some(h)) => notes.push(format!(
                    "HEAD with checksum mode after a multipart upload returned {:?}, not the whole-object CRC64",
                    h.raw
                )),
                Ok(None) => notes.push("HEAD after a multipart upload found no object".into()),
                Err(e) => notes.push(format!("HEAD with checksum mode failed: {e}")),
            },
            Err(e) => notes.push(format!("checksum multipart upload failed: {e}")),
        }
    }
    caps.notes.extend(notes);
}

async fn cleanup(store: &RemoteStore, dir: &Path, caps: &mut Capabilities) {
    use futures::TryStreamExt;
    let os = store.object_store();
    let listed: Vec<_> = match os.list(Some(dir)).try_collect().await {
        Ok(v) => v,
        Err(e) => {
            caps.notes
                .push(format!("could not list probe objects for cleanup: {e}"));
            return;
        }
    };
    for m in listed {
        if let Err(e) = os.delete(&m.location).await {
            caps.notes
                .push(format!("could not delete probe object {}: {e}", m.location));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::StoreOptions;
    use futures::TryStreamExt;

    #[tokio::test]
    async fn memory_store_answers() {
        let s = RemoteStore::from_url("memory://p", &StoreOptions::default()).unwrap();
        let c = probe(&s).await.unwrap();
        assert!(c.conditional_create, "{c:?}");
        assert!(c.conditional_update, "{c:?}");
        assert!(c.multipart, "{c:?}");
        assert!(c.range_get, "{c:?}");
        assert!(c.metadata, "{c:?}");
        let left: Vec<_> = s.object_store().list(None).try_collect().await.unwrap();
        assert!(left.is_empty(), "probe left {left:?}");
    }

    /// One probe serves every store built from the same URL, options and
    /// variables; another URL, a `memory://` store and a failed probe are
    /// not shared.
    #[tokio::test]
    async fn a_probe_answer_is_shared_by_stores_built_alike_only() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("store");
        let url = format!("file://{}", dir.display());
        let opts = StoreOptions::default();
        let a = RemoteStore::from_url(&url, &opts).unwrap();
        let first = probe_shared(&a).await.unwrap();
        assert!(first.conditional_create, "{first:?}");
        // Built before the directories are replaced by files, so that a
        // probe there fails.
        let b = RemoteStore::from_url(&url, &opts).unwrap();
        let dir2 = d.path().join("store2");
        let other = RemoteStore::from_url(&format!("file://{}", dir2.display()), &opts).unwrap();
        for p in [&dir, &dir2] {
            std::fs::remove_dir_all(p).unwrap();
            std::fs::write(p, b"not a directory").unwrap();
        }
        assert!(probe(&b).await.is_err(), "a real probe fails");
        assert_eq!(probe_shared(&b).await.unwrap(), first, "answered from the first");
        assert!(probe_shared(&other).await.is_err(), "another URL is probed");
        let m = RemoteStore::from_url("memory://p", &opts).unwrap();
        assert_eq!(m.probe_key(), None);
    }

    #[tokio::test]
    async fn local_store_answers() {
        let d = tempfile::tempdir().unwrap();
        let url = url::Url::from_directory_path(d.path()).unwrap();
        let s = RemoteStore::from_url(url.as_str(), &StoreOptions::default()).unwrap();
        let c = probe(&s).await.unwrap();
        // LocalFileSystem: create is atomic (hard link), no If-Match, no
        // metadata; multipart through local_multipart.rs; ranges work.
        assert!(c.conditional_create, "{c:?}");
        assert!(!c.conditional_update, "{c:?}");
        assert!(c.multipart, "{c:?}");
        assert!(c.range_get, "{c:?}");
        assert!(!c.metadata, "{c:?}");
        assert!(c.notes.len() >= 2, "{c:?}");
        let left: Vec<_> = s.object_store().list(None).try_collect().await.unwrap();
        assert!(left.is_empty(), "probe left {left:?}");
    }
}
