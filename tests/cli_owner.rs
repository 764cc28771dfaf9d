//! `tierindex owner show|take|release` against the embedded `file://` store.

use std::process::{Command, Output};

fn run(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tierindex"))
        .env("TIERINDEX_DATA_DIR", dir.join("data"))
        .env(
            "TIERINDEX_STORE",
            format!("file://{}", dir.join("store").display()),
        )
        .env_remove("TIERINDEX_CONFIG")
        .env_remove("TIERINDEX_STREAM")
        .args(args)
        .output()
        .expect("run tierindex")
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("json output")
}

#[test]
fn owner_take_is_exclusive_until_released() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("data")).unwrap();
    std::fs::create_dir_all(d.path().join("store")).unwrap();

    let v = json(&run(d.path(), &["--json", "owner"]));
    assert_eq!(v["manifest"], false);

    let v = json(&run(
        d.path(),
        &[
            "--json",
            "owner",
            "take",
            "--owner-id",
            "a",
            "--ttl-ms",
            "600000",
        ],
    ));
    assert_eq!(
        (v["epoch"].as_u64(), v["owner"].as_str()),
        (Some(1), Some("a"))
    );
    assert_eq!(v["lease_live"], true);

    // b is refused while a's lease is live, and told who holds it.
    let o = run(d.path(), &["owner", "take", "--owner-id", "b"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("\"a\""), "{err}");
    let v = json(&run(d.path(), &["--json", "owner", "show"]));
    assert_eq!(
        (v["epoch"].as_u64(), v["owner"].as_str()),
        (Some(1), Some("a"))
    );

    // Releasing (or taking again) as a by its bare id would fence a broker
    // still running as a: refused while a's lease is live, nothing written.
    for action in ["release", "take"] {
        let o = run(d.path(), &["owner", action, "--owner-id", "a"]);
        assert_eq!(o.status.code(), Some(1), "{action}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("owner a holds a live lease") && err.contains("--fence-live"),
            "{action}: {err}"
        );
    }
    let v = json(&run(d.path(), &["--json", "owner", "show"]));
    assert_eq!(
        (v["epoch"].as_u64(), v["owner"].as_str()),
        (Some(1), Some("a"))
    );

    // The operator says a is gone: a's lease is released; b takes with a
    // new epoch.
    let v = json(&run(
        d.path(),
        &[
            "--json",
            "owner",
            "release",
            "--owner-id",
            "a",
            "--fence-live",
        ],
    ));
    assert_eq!(v["owner"], serde_json::Value::Null);
    let v = json(&run(
        d.path(),
        &["--json", "owner", "take", "--owner-id", "b"],
    ));
    assert_eq!(v["owner"], "b");
    assert!(v["epoch"].as_u64().unwrap() > 1, "{v}");
}

/// `owner` on a data directory acts in the store and on the stream its
/// IDENTITY records (helper-49: without --store it used the default store
/// beside the working directory, and `take` created a manifest there,
/// leaving the real one untouched), and refuses another store unless
/// --store-override.
#[test]
fn owner_on_a_data_directory_uses_its_recorded_store() {
    let d = tempfile::tempdir().unwrap();
    let (data, store) = (d.path().join("data"), d.path().join("st"));
    let bare = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tierindex"))
            .current_dir(d.path())
            .env_remove("TIERINDEX_DATA_DIR")
            .env_remove("TIERINDEX_STORE")
            .env_remove("TIERINDEX_CONFIG")
            .env_remove("TIERINDEX_STREAM")
            .args(args)
            .output()
            .expect("run tierindex")
    };
    let url = format!("file://{}", store.display());
    let data_s = data.to_str().unwrap();
    let o = bare(&[
        "--data-dir",
        data_s,
        "--store",
        &url,
        "--stream",
        "orders",
        "demo",
        "--entries",
        "2000",
        "--rate",
        "100000",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for args in [
        vec!["--json", "owner", "--data-dir", data_s, "show"],
        vec!["--json", "owner", "take", "--data-dir", data_s],
        vec!["--json", "--data-dir", data_s, "owner", "show"],
    ] {
        let v = json(&bare(&args));
        assert_eq!(v["stream"].as_str(), Some("orders"), "{args:?}: {v}");
        assert_eq!(v["committed_segments"].as_u64(), Some(1), "{args:?}: {v}");
    }
    assert!(
        !d.path().join("tierindex-store").exists(),
        "the default store was used"
    );
    let o = bare(&[
        "owner",
        "--data-dir",
        data_s,
        "--store",
        &format!("file://{}", d.path().join("other").display()),
        "show",
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--store-override"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
