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
