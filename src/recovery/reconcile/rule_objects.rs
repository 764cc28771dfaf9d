//! Rule 1: every journal segment at `Verified` or later has its object,
//! whole; a missing or wrong one is re-uploaded from an intact local copy,
//! else it is LOST (nothing deleted to get past it).

use super::*;

impl Run<'_> {
    /// Rule 1 (see the module doc of `reconcile`).
    pub(super) async fn journal_objects(&mut self) -> Result<()> {
        let (store, stream) = (self.store, self.stream);
        // Fields borrowed apart: the journal view is read while the
        // findings and the known sizes are written.
        for r in self.view.segments().values() {
            if !matches!(
                r.state,
                SegmentState::Verified | SegmentState::Committed | SegmentState::Released
            ) {
                continue;
            }
            let key = record_key(store, stream, r, self.cfg.manifest)?;
            let k = key.to_string();
            self.checked.insert(k.clone());
            let Some((kind, detail)) =
                check_object(store, &key, &r.meta, &self.sizes, self.opts.deep).await?
            else {
                continue;
            };
            let present = self.sizes.contains_key(&k);
            let f = repair_object(
                store,
                self.cfg,
                self.opts,
                &self.seg_dir,
                kind,
                &key,
                &r.meta,
                present,
                detail,
            )
            .await;
            if f.repaired {
                self.sizes.insert(k, r.meta.file_len);
            } else {
                self.bad.insert(k);
            }
            self.findings.push(f);
        }
        Ok(())
    }
}
