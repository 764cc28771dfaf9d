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
