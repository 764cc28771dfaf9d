//! [`TierIndex::adopt_unjournaled`]: the repair for local sealed files the
//! journal can never record ("NOT JOURNALED").

use super::*;

/// One sealed file whose entries were appended again.
#[derive(Clone, Debug, Serialize)]
pub struct Adopted {
    /// The segment the file held.
    pub segment: u64,
    /// Its entries, appended again to the active segment and flushed.
    pub entries: usize,
    /// Where the file went (under `quarantine/`).
    pub moved_to: Option<String>,
}

impl TierIndex {
    /// Local sealed files the journal has no record of, below its highest
    /// id, are never uploaded: the journal takes a segment only above every
    /// id it ever recorded (a second process sealed them beside this one, or
    /// the journal lost their records). `drain` and `status` report them as
    /// `NOT JOURNALED` and exit 4; this is the repair an operator chooses
    /// once `tierindex inspect` shows they belong to this stream (`tierindex
    /// drain --adopt-unjournaled`): each one's entries are appended again to
    /// the active segment and flushed (so they are sealed, journaled and
    /// uploaded with it), and only then is the file moved to `quarantine/`
    /// with the reason. A crash in between leaves the file in place: its
    /// entries are then held twice, never zero times. A file the store
    /// holds as committed (listed in the manifest with its checksum, or
    /// without a manifest its object at its length) is left alone: its
    /// entries are there already. So is every file when the store cannot be
    /// asked within `limit` (nothing is adopted on a guess).
    pub async fn adopt_unjournaled(&self, limit: Duration) -> Result<Vec<Adopted>> {
        let sh = self.sh().clone();
        let candidates = sh.unjournaled_below_max();
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        // Ask the store about every one first: a store that does not answer
        // adopts nothing.
        let mut to_adopt = Vec::new();
        let asked = async {
            for id in candidates {
                if !sh.committed_elsewhere(id).await {
                    to_adopt.push(id);
                }
            }
        };
        if tokio::time::timeout(limit, asked).await.is_err() {
            return Err(Error::Remote(format!(
                "the store did not say within {limit:?} whether it holds the sealed files the \
                 journal cannot record; nothing was adopted (run again once it answers)"
            )));
        }
        let writer = sh.writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
            let mut out = Vec::new();
            for id in to_adopt {
                let Some(seg) = w.sealed(id)? else { continue };
                let entries = seg.entries();
                drop(seg);
                for e in &entries {
                    w.append_entry(*e)?;
                }
                w.flush()?;
                let reason = format!(
                    "local sealed file without a journal record below the journal's highest id \
                     (NOT JOURNALED); adopted by `drain --adopt-unjournaled`: its {} entries \
                     were appended again to active segment {}",
                    entries.len(),
                    w.active_id().map_or(0, |a| a.0)
                );
                let moved = w.quarantine_sealed(id, &reason)?;
                tracing::warn!(segment = id.0, entries = entries.len(), "{reason}");
                out.push(Adopted {
                    segment: id.0,
                    entries: entries.len(),
                    moved_to: moved.map(|p| p.display().to_string()),
                });
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::Internal(format!("adopt task failed: {e}")))?
    }
}
