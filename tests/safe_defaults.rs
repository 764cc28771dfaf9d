//! Issue 11, "safe by default", on the embedded `file://` store: the
//! operator scenarios of `tests/scenarios` with default settings (the
//! remote manifest on). The same scenarios run on the real servers in
//! `tests/s3_suite.rs`.

#[path = "scenarios/mod.rs"]
mod scenarios;

use scenarios::Target;

fn target(tmp: &std::path::Path) -> Target {
    // Not the default store location (`<data_dir>/../tierindex-store`): a
    // command that ignored the data directory's recorded store would look
    // in the wrong place and find nothing.
    let dir = tmp.join("bucket");
    std::fs::create_dir_all(&dir).unwrap();
    Target {
        store_url: format!("file://{}", dir.display()),
        endpoint: None,
        region: None,
        env: Vec::new(),
    }
}

#[test]
fn the_manifest_is_the_default() {
    assert!(tierindex::Config::default().manifest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_data_directory_continues_above_the_stream_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    scenarios::lost_data_directory(&target(tmp.path()), tmp.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_backup_continues_above_the_stream_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    scenarios::restored_backup(&target(tmp.path()), tmp.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_directory_on_a_live_stream_is_refused_naming_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    scenarios::two_directories(&target(tmp.path()), tmp.path()).await;
}

/// The manifest (the default) with the probe turned off is refused with
/// what was actually done: no probe ran, so the message must not say one
/// saw an overwrite, and it names the three ways out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifest_without_the_probe_is_refused_saying_so() {
    let tmp = tempfile::tempdir().unwrap();
    let t = target(tmp.path());
    let cfg = tierindex::Config {
        data_dir: tmp.path().join("data"),
        store: Some(t.store_url.clone()),
        probe_store: false,
        ..tierindex::Config::default()
    };
    let err = match tierindex::TierIndex::open(cfg).await {
        Ok(_) => panic!("opened with the manifest on an unprobed store"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("probe_store = false"), "{err}");
    assert!(!err.contains("its probe saw"), "{err}");
    for way in ["manifest = false", "allow_unconditional_store = true"] {
        assert!(err.contains(way), "{err}");
    }
    // Nothing was created in the store by the refusal.
    let store_dir = tmp.path().join("bucket");
    assert_eq!(std::fs::read_dir(&store_dir).unwrap().count(), 0);
}

/// A store that lost the stream (an emptied or unmounted `file://`
/// directory, a typo naming another bucket) is refused at open when the
/// journal records segments committed to its manifest: before, the open
/// started a new manifest at epoch 1 there and the broker reported a clean
/// drain while the store held none of what it had committed. Nothing is
/// written to that store, the message says what to check and do, and the
/// way out it names (`reconcile --repair`) restores the stream from the
/// local copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_lost_the_stream_is_refused_at_open_naming_what_was_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let t = target(tmp.path());
    let cfg = tierindex::Config {
        release_after_commit: false,
        ..t.config(&tmp.path().join("data"))
    };
    let mut model = scenarios::Model::new();
    scenarios::fill(&cfg, 0..1_000, &mut model).await;
    let bucket = tmp.path().join("bucket");
    let lost = tmp.path().join("bucket.lost");
    std::fs::rename(&bucket, &lost).unwrap();
    std::fs::create_dir_all(&bucket).unwrap();
    let err = match tierindex::TierIndex::open(cfg.clone()).await {
        Ok(_) => panic!("opened on a store that lost every committed segment"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("has no manifest for stream"), "{err}");
    assert!(err.contains("committed"), "{err}");
    assert!(err.contains("reconcile --repair"), "{err}");
    assert!(err.contains("owner take"), "{err}");
    assert_eq!(
        std::fs::read_dir(&bucket).unwrap().count(),
        0,
        "the refusal wrote to the store"
    );
    // The way out the message names, for a store that really lost them:
    // `reconcile --repair` re-uploads the local copies and rebuilds the
    // manifest from them; then the broker opens and every entry is read
    // back from the store.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tierindex"))
        .env_clear()
        .env("TIERINDEX_LOG", "warn")
        .arg("--data-dir")
        .arg(&cfg.data_dir)
        .args(["reconcile", "--repair"])
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("manifest lost"), "{out}");
    scenarios::fill(&cfg, 1_000..1_100, &mut model).await;
    t.assert_readable(&cfg.data_dir, &model);
}

/// An open without `IDENTITY` (moved aside as damaged) naming a mistyped
/// store is refused as above, and leaves no `IDENTITY` naming that store
/// behind: before, the data directory was then bound to the typo, the
/// right store was refused, and the refusal's own advice rebuilt the
/// stream in the typo (helper-51, session 27). The right store then opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_open_does_not_bind_the_data_directory_to_a_mistyped_store() {
    let tmp = tempfile::tempdir().unwrap();
    let t = target(tmp.path());
    let cfg = tierindex::Config {
        release_after_commit: false,
        ..t.config(&tmp.path().join("data"))
    };
    let mut model = scenarios::Model::new();
    scenarios::fill(&cfg, 0..500, &mut model).await;
    let identity = cfg.data_dir.join("IDENTITY");
    std::fs::rename(&identity, cfg.data_dir.join("IDENTITY.damaged")).unwrap();
    let typo = tierindex::Config {
        store: Some(format!("file://{}", tmp.path().join("bukcet").display())),
        ..cfg.clone()
    };
    let err = match tierindex::TierIndex::open(typo).await {
        Ok(_) => panic!("opened on a store that holds none of the committed segments"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("has no manifest for stream"), "{err}");
    assert!(
        !identity.exists(),
        "the refused open left an IDENTITY behind"
    );
    scenarios::fill(&cfg, 500..600, &mut model).await;
    let recorded = std::fs::read_to_string(&identity).unwrap();
    assert!(recorded.contains("/bucket"), "{recorded}");
    t.assert_readable(&cfg.data_dir, &model);
}

/// A single-writer data directory switched to the manifest has committed
/// segments and a store with no manifest until its first take succeeds:
/// that is not a store that lost the stream. A first switching open that
/// fails before the take (here: the probe turned off) must not turn the
/// next one into that refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_to_the_manifest_that_failed_once_is_not_taken_for_a_lost_store() {
    let tmp = tempfile::tempdir().unwrap();
    let t = target(tmp.path());
    let single = tierindex::Config {
        manifest: false,
        release_after_commit: false,
        ..t.config(&tmp.path().join("data"))
    };
    let mut model = scenarios::Model::new();
    scenarios::fill(&single, 0..500, &mut model).await;
    let switch = tierindex::Config {
        manifest: true,
        switch_mode: true,
        ..single.clone()
    };
    let failed = tierindex::Config {
        probe_store: false,
        ..switch.clone()
    };
    assert!(tierindex::TierIndex::open(failed).await.is_err());
    let (ti, _) = match tierindex::TierIndex::open(switch).await {
        Ok(x) => x,
        Err(e) => panic!("the switch's second open was refused: {e}"),
    };
    let r = ti.shutdown(std::time::Duration::from_secs(60)).await;
    assert!(r.error.is_none(), "{r:?}");
}

/// Two brokers on one stream, the second configured with `manifest =
/// false` (helper-51): the single-writer open went ahead beside the live
/// manifest owner, and its segments never reached the manifest. It is
/// refused now (`Claimed`, naming the owner); once the owner shut down and
/// released its lease, it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_writer_open_beside_a_live_manifest_owner_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = target(tmp.path());
    let owner_cfg = t.config(&tmp.path().join("a"));
    assert!(owner_cfg.manifest);
    let (owner, _) = tierindex::TierIndex::open(owner_cfg.clone()).await.unwrap();
    let single = tierindex::Config {
        manifest: false,
        ..t.config(&tmp.path().join("b"))
    };
    let err = match tierindex::TierIndex::open(single.clone()).await {
        Ok(_) => panic!("a single-writer open beside a live manifest owner was accepted"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), tierindex::ErrorKind::Claimed, "{err}");
    let holder = owner_cfg.effective_owner_id().unwrap();
    assert!(err.to_string().contains(&holder), "{err}");
    assert!(err.to_string().contains("manifest = false"), "{err}");
    let r = owner.shutdown(std::time::Duration::from_secs(60)).await;
    assert!(r.error.is_none(), "{r:?}");
    let (ti, _) = match tierindex::TierIndex::open(single).await {
        Ok(x) => x,
        Err(e) => panic!("refused after the owner shut down: {e}"),
    };
    let r = ti.shutdown(std::time::Duration::from_secs(60)).await;
    assert!(r.error.is_none(), "{r:?}");
}
