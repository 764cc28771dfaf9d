//! Rule 5: incomplete multipart uploads older than the grace period.

use super::*;

/// Rule 5: a finding per upload initiated longer ago than the grace period,
/// aborted with `repair` when its key is one of ours. Returns the report's
/// `multipart_uploads` line.
pub(super) async fn stale_uploads(
    store: &RemoteStore,
    cfg: &Config,
    opts: &ReconcileOptions,
    view: &JournalView,
    uploads: &[PendingUpload],
    now: u64,
    findings: &mut Vec<Finding>,
) -> String {
    let grace_ms = u64::try_from(opts.grace.as_millis()).unwrap_or(u64::MAX);
    let (mut stale, mut aborted) = (0usize, 0usize);
    for u in uploads {
        // Unknown initiation time: it may be in flight, like a young one.
        let Some(age) = u.initiated_ms.map(|t| now.saturating_sub(t)) else {
            continue;
        };
        if age < grace_ms {
            continue;
        }
        stale += 1;
        let key = Path::parse(&u.key).ok();
        let ours = key
            .as_ref()
            .and_then(|k| keys::parse_segment_key(store.prefix(), k))
            .filter(|(s, _, _)| *s == cfg.stream);
        let current = ours
            .as_ref()
            .and_then(|(_, id, _)| view.get(*id))
            .filter(|r| {
                r.state == SegmentState::Uploading
                    && r.multipart_id.as_deref() == Some(u.upload_id.as_str())
                    && r.key.as_deref() == Some(u.key.as_str())
            });
        let mut f = Finding::new(
            FindingKind::StaleMultipart,
            ours.as_ref().map(|(_, id, _)| *id),
            &u.key,
            format!(
                "upload {:?} initiated {age} ms ago{}",
                u.upload_id,
                if current.is_some() {
                    "; the journal's current attempt of this segment (Uploading)"
                } else {
                    ""
                }
            ),
        );
        match (key, ours.is_some()) {
            (Some(key), true) if opts.repair => {
                match upload::abort_multipart_cfg(store, &key, &u.upload_id, &cfg.upload_config())
                    .await
                {
                    Ok(()) => {
                        aborted += 1;
                        f.repaired = true;
                        f.action = "aborted".into();
                    }
                    Err(e) => f.action = format!("abort failed: {e}"),
                }
            }
            (_, true) => f.action = "none (--repair aborts it)".into(),
            (_, false) => {
                f.informational = true;
                f.action = "kept: not a segment key of this stream; foreign uploads are \
                            never aborted"
                    .into();
            }
        }
        findings.push(f);
    }
    format!(
        "checked: {} in progress, {stale} stale, {aborted} aborted",
        uploads.len()
    )
}


impl Run<'_> {
    /// Rule 5 over the listing of incomplete multipart uploads; returns the
    /// report's `multipart_uploads` line (what was checked, or why not).
    /// `now`: the time ages are judged at.
    pub(super) async fn multipart(&mut self, now: u64) -> String {
        match self.store.list_multipart_uploads(&self.prefix).await {
            Ok(MultipartListing::Listed(ups)) => {
                stale_uploads(
                    self.store,
                    self.cfg,
                    self.opts,
                    &self.view,
                    &ups,
                    now,
                    &mut self.findings,
                )
                .await
            }
            Ok(MultipartListing::BackendCannotList) => MULTIPART_NOT_CHECKED.to_string(),
            Ok(MultipartListing::NotSupportedByServer(why)) => {
                format!("not checked (not supported by this server: {why})")
            }
            Err(e) => format!("not checked (listing failed: {e})"),
        }
    }
}
