//! Manifest writes of a repair: take ownership (never from a live owner),
//! commit entries, write damage notes, release.

use super::*;

/// Takes ownership as the config's owner for one repair write. The `Err`
/// is the finding's action text ("`what` ..."): a live lease of another
/// owner is never fenced.
pub(super) async fn take_for_repair(
    store: &RemoteStore,
    cfg: &Config,
    what: &str,
) -> std::result::Result<(ManifestWriter, String), String> {
    let fail = |e: Error| format!("{what}: {e}");
    let owner = cfg.effective_owner_id().map_err(fail)?;
    let ms = ManifestStore::open(store, &cfg.stream, cfg.manifest_options())
        .await
        .map_err(fail)?;
    match ms.take_ownership(&owner, cfg.lease_ttl()).await {
        Ok(w) => Ok((w, owner)),
        Err(Error::Claimed(m)) => Err(format!(
            "{what} (Claimed): {m}; the reconciler never fences a live owner"
        )),
        Err(e) => Err(fail(e)),
    }
}

/// Gives the lease taken by [`take_for_repair`] back; `done` is the action.
pub(super) async fn release_after_repair(w: ManifestWriter, done: String) -> String {
    match w.release().await {
        Ok(()) => done,
        Err(e) => format!("{done} (releasing the lease failed: {e})"),
    }
}

/// Commits `entries` as the config's owner, then releases the lease. The
/// `Err` is the action text when nothing was committed.
pub(super) async fn commit_entries(
    store: &RemoteStore,
    cfg: &Config,
    entries: &[SegmentEntry],
) -> std::result::Result<String, String> {
    let (mut w, owner) = take_for_repair(store, cfg, "not repaired").await?;
    let out = match w.commit(entries).await {
        Ok(out) => out,
        Err(e) => {
            let _ = w.release().await;
            return Err(format!("not repaired: {e}"));
        }
    };
    let done = match out {
        CommitOutcome::Committed { version, added } => {
            format!("committed {added} entr(ies) in manifest version {version} as owner {owner:?}")
        }
        CommitOutcome::AlreadyCommitted { version } => {
            format!("already listed in manifest version {version}")
        }
    };
    Ok(release_after_repair(w, done).await)
}

/// Clears and adds manifest damage notes as the config's owner, then
/// releases the lease. The `Err` is the action text when nothing was
/// written.
pub(super) async fn write_notes(
    store: &RemoteStore,
    cfg: &Config,
    clears: &[SegmentId],
    marks: &[DamageNote],
) -> std::result::Result<String, String> {
    let what = "manifest not updated";
    let (mut w, owner) = take_for_repair(store, cfg, what).await?;
    if let Err(e) = apply_notes(&mut w, clears, marks).await {
        let _ = w.release().await;
        return Err(format!("{what}: {e}"));
    }
    let done = format!(
        "manifest notes: {} cleared, {} marked lost (version {}, owner {owner:?})",
        clears.len(),
        marks.len(),
        w.manifest().version
    );
    Ok(release_after_repair(w, done).await)
}

/// Clears the damage notes of `clears`, then adds `marks`.
pub(crate) async fn apply_notes(
    w: &mut ManifestWriter,
    clears: &[SegmentId],
    marks: &[DamageNote],
) -> Result<()> {
    for id in clears {
        w.clear_damage(*id).await?;
    }
    for n in marks {
        w.mark_damaged(n.clone()).await?;
    }
    Ok(())
}


/// Records the operator's acceptance of each loss as the config's owner,
/// then releases the lease. The `Err` is the action text when nothing was
/// written (an acceptance written before an error stays).
pub(super) async fn accept_losses(
    store: &RemoteStore,
    cfg: &Config,
    losses: &[(SegmentId, String)],
    reason: &str,
) -> std::result::Result<String, String> {
    let what = "loss not accepted";
    let (mut w, owner) = take_for_repair(store, cfg, what).await?;
    for (id, key) in losses {
        if let Err(e) = w.accept_loss(*id, key, reason).await {
            let _ = w.release().await;
            return Err(format!("{what}: {e}"));
        }
    }
    let done = format!(
        "LOSS ACCEPTED by the operator in manifest version {} (owner {owner:?}): {reason:?}",
        w.manifest().version
    );
    Ok(release_after_repair(w, done).await)
}
