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
    /// entries are there already. Nothing is adopted when the store cannot
    /// say, for any of them, within `limit` (nothing on a guess), nor a file
    /// whose items do not all verify. A rerun after a crash between the
    /// append and the move appends the file's entries once more: held
    /// twice or more, never zero times.
    pub async fn adopt_unjournaled(&self, limit: Duration) -> Result<Vec<Adopted>> {
        let sh = self.sh().clone();
        let candidates = sh.unjournaled_below_max();
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        // Ask the store about every one first, and act only on a definite
        // "not held": a store that cannot say (not owner, an error, no
        // answer in time) adopts nothing (helper-64: an error read as "not
        // held" would upload a committed file's entries again).
        let mut to_adopt = Vec::new();
        let mut unknown = Vec::new();
        let asked = async {
            for id in candidates {
                match sh.committed_elsewhere_known(id).await {
                    Some(false) => to_adopt.push(id),
                    Some(true) => {}
                    None => unknown.push(id.0),
                }
            }
        };
        if tokio::time::timeout(limit, asked).await.is_err() {
            return Err(Error::Remote(format!(
                "the store did not say within {limit:?} whether it holds the sealed files the \
                 journal cannot record; nothing was adopted (run again once it answers, or \
                 with a longer --deadline)"
            )));
        }
        if !unknown.is_empty() {
            return Err(Error::Remote(format!(
                "the store could not say whether it holds segments {unknown:?} (not the \
                 stream's owner, or an error); nothing was adopted (run again once it answers)"
            )));
        }
        let writer = sh.writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
            let mut out: Vec<Adopted> = Vec::new();
            let done = |out: &Vec<Adopted>| {
                out.iter()
                    .map(|a| a.segment)
                    .collect::<Vec<_>>()
            };
            for id in to_adopt {
                let step = (|| -> Result<Option<Adopted>> {
                    let Some(meta) = w.sealed_meta(id)? else {
                        return Ok(None);
                    };
                    let Some(seg) = w.sealed(id)? else {
                        return Ok(None);
                    };
                    let entries = seg.entries();
                    drop(seg);
                    // Every item, or the file is left as it is: adopted
                    // short, the items that do not verify would be reported
                    // nowhere (helper-64).
                    if entries.len() as u64 != meta.item_count {
                        return Err(Error::corrupt(
                            format!("segment {id}"),
                            format!(
                                "{} of its {} items do not verify: not adopted; `tierindex \
                                 inspect` shows the file",
                                meta.item_count.saturating_sub(entries.len() as u64),
                                meta.item_count
                            ),
                        ));
                    }
                    // The segment the first entry went to (a drain opens
                    // with no active segment: the first append makes it;
                    // helper-79 F5: "from active segment 0 on").
                    let mut into = None;
                    for e in &entries {
                        w.append_entry(*e)?;
                        into = into.or(w.active_id());
                    }
                    let into = into.map_or(0, |a| a.0);
                    w.flush()?;
                    let reason = format!(
                        "local sealed file without a journal record below the journal's \
                         highest id (NOT JOURNALED); adopted by `drain --adopt-unjournaled`: \
                         its {} entries were appended again from active segment {into} on",
                        entries.len()
                    );
                    let moved = w.quarantine_sealed(id, &reason)?;
                    tracing::warn!(segment = id.0, entries = entries.len(), "{reason}");
                    Ok(Some(Adopted {
                        segment: id.0,
                        entries: entries.len(),
                        moved_to: moved.map(|p| p.display().to_string()),
                    }))
                })();
                match step {
                    Ok(Some(a)) => out.push(a),
                    Ok(None) => {}
                    // What was adopted before the error is said with it.
                    Err(e) => {
                        return Err(Error::Internal(format!(
                            "adopting segment {id} failed: {e}; adopted before it: {:?}",
                            done(&out)
                        )));
                    }
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::Internal(format!("adopt task failed: {e}")))?
    }
}
