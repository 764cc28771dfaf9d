//! Damage notes in the manifest (written by readers that confirmed a
//! damaged object): a note whose object verifies whole now is cleared, a
//! damaged object with a local copy is repaired, one without is marked
//! LOST; and lost segments (rules 1 and 2) the manifest lists without a
//! note are marked, so every reader says LOST instead of failing a read.

use super::*;

impl Run<'_> {
    /// The damage notes (see the module doc).
    pub(super) async fn damage_notes(&mut self) -> Result<()> {
        let (store, cfg, opts) = (self.store, self.cfg, self.opts);
        let Some(m) = &self.manifest else {
            return Ok(());
        };
        let fetcher = Fetcher::new(
            store.clone(),
            cfg.upload_config().retry_policy(),
            crate::remote::fetch::REMOTE_INDEX_CACHE_BYTES,
        );
        for note in &m.damaged {
            let Some(e) = self.m_entries.get(&note.id) else {
                let mut f = Finding::new(
                    FindingKind::ManifestDamaged,
                    Some(note.id),
                    &note.key,
                    format!(
                        "note for a segment the manifest does not list: {}",
                        note.reason
                    ),
                );
                f.action = "none: an operator must inspect the manifest".into();
                self.findings.push(f);
                continue;
            };
            let key = Path::parse(&e.key)
                .map_err(|err| Error::corrupt("manifest entry", format!("{:?}: {err}", e.key)))?;
            let detail = format!(
                "marked {}damaged: {}",
                if note.lost { "LOST and " } else { "" },
                note.reason
            );
            // Rule 1 or 2 already judged this key in this run: do not read,
            // repair or count it twice; the note follows that finding.
            let prior = self
                .findings
                .iter()
                .position(|f| f.key == e.key && f.kind != FindingKind::ManifestDamaged);
            // Whole now (restored by someone, or repaired above)? A LOST note
            // whose object has not changed since it was marked is not
            // downloaded again, except by `--deep`, which reads every object:
            // a backup restored with its old modification time (`cp -p`,
            // `rsync -a`) was never read again, and stayed LOST while
            // `verify` read it whole (helper-72 F1). A store that cannot
            // answer decides nothing.
            let unchanged_lost = note.lost
                && !opts.deep
                && self
                    .ours
                    .get(&e.key)
                    .is_none_or(|o| o.modified_ms <= note.marked_ms);
            let whole = match prior.and_then(|i| self.findings.get(i)) {
                Some(p) => Ok(p.repaired),
                None if unchanged_lost || !self.object_ok(&e.key, e.file_len) => Ok(false),
                None => fetcher
                    .confirm_damage(&RemoteSegment::from_entry(e)?)
                    .await
                    .map(|d| d.is_none()),
            };
            let whole = match whole {
                Ok(w) => w,
                Err(err) => {
                    let mut f =
                        Finding::new(FindingKind::ManifestDamaged, Some(e.id), &e.key, detail);
                    f.action = format!("not checked: the store did not answer ({err})");
                    self.findings.push(f);
                    continue;
                }
            };
            let mut f = if whole {
                let mut f = Finding::new(FindingKind::ManifestDamaged, Some(e.id), &e.key, detail);
                f.action = if prior.is_some() {
                    "the object was repaired above".into()
                } else {
                    "the object verifies whole now".into()
                };
                f
            } else if let Some(p) = prior.and_then(|i| self.findings.get(i)) {
                let mut f = Finding::new(FindingKind::ManifestDamaged, Some(e.id), &e.key, detail);
                f.informational = true;
                f.action = format!("see the {} finding above", p.kind.describe());
                f
            } else {
                let present = self.sizes.contains_key(&e.key);
                self.repair_from_local(FindingKind::ManifestDamaged, e, &key, present, detail)
                    .await
            };
            let seg_lost = f.lost
                || prior
                    .and_then(|i| self.findings.get(i))
                    .is_some_and(|p| p.lost);
            if seg_lost {
                let mine = self.findings.len();
                if let Some(a) = note.accepted.as_ref().filter(|_| note.lost) {
                    f.accepted_loss = true;
                    f.action.push_str(&format!("; {}", a.describe()));
                    if let Some(p) = prior.and_then(|i| self.findings.get_mut(i)) {
                        p.accepted_loss = true;
                    }
                } else if opts.accept_loss.contains(&e.id) {
                    self.accepts.push((e.id, e.key.clone()));
                    self.accept_findings.push(mine);
                    self.accept_findings.extend(prior);
                }
                if !note.lost {
                    if opts.repair && cfg.manifest {
                        self.marks.push(DamageNote::new(
                            e,
                            &note.reason,
                            true,
                            crate::segment::now_ms(),
                        ));
                        self.note_findings.push(self.findings.len());
                    } else {
                        f.action
                            .push_str(" (--repair marks it lost in the manifest)");
                    }
                }
            } else if whole || f.repaired {
                self.sizes.insert(e.key.clone(), e.file_len);
                self.bad.remove(&e.key);
                if opts.repair && cfg.manifest {
                    self.clears.push(e.id);
                    f.repaired = false; // until the note is cleared
                    self.note_findings.push(self.findings.len());
                } else {
                    f.repaired = false;
                    f.action.push_str(if cfg.manifest {
                        "; none (--repair clears the note)"
                    } else {
                        "; none: manifest = false in the config (the note stays)"
                    });
                }
            }
            self.findings.push(f);
        }
        // Lost segments (rules 1 and 2) the manifest lists without a note:
        // mark them, so every reader says LOST instead of failing a read.
        if opts.repair && cfg.manifest {
            for i in 0..self.findings.len() {
                let Some(f) = self.findings.get(i) else {
                    continue;
                };
                let Some(e) = f.segment.and_then(|id| self.m_entries.get(&SegmentId(id))) else {
                    continue;
                };
                if !f.lost
                    || f.kind == FindingKind::ManifestDamaged
                    || f.key != e.key
                    || m.damage(e.id).is_some()
                    || self.marks.iter().any(|n| n.id == e.id)
                {
                    continue;
                }
                self.marks.push(DamageNote::new(
                    e,
                    &f.detail,
                    true,
                    crate::segment::now_ms(),
                ));
                self.note_findings.push(i);
                if opts.accept_loss.contains(&e.id) {
                    self.accepts.push((e.id, e.key.clone()));
                    self.accept_findings.push(i);
                }
            }
        }
        Ok(())
    }

    /// Each segment the operator asked to accept the loss of that this run
    /// did not find LOST is a finding: nothing is accepted for it.
    pub(super) fn unaccepted(&mut self) {
        for id in &self.opts.accept_loss {
            let found = self.accepts.iter().any(|(a, _)| a == id)
                || self
                    .findings
                    .iter()
                    .any(|f| f.segment == Some(id.0) && f.accepted_loss);
            if found {
                continue;
            }
            let key = self.m_entries.get(id).map_or("", |e| e.key.as_str());
            let mut f = Finding::new(
                FindingKind::ManifestDamaged,
                Some(*id),
                key,
                format!(
                    "asked to accept the loss of segment {id}, which this run did not find \
                     LOST (the manifest does not list it, its object reads whole, or a local \
                     copy repaired it or can)"
                ),
            );
            f.action = "nothing accepted".into();
            self.findings.push(f);
        }
    }
}
