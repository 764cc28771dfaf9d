//! The recovery tool against a stream another owner now holds: a broker
//! (owner "a") ran and stopped; a new owner ("b") took the stream. Running
//! `tierindex drain` or `demo` on a's data directory must be refused while
//! b's lease is live, naming b, and publish nothing: both never publish.

use std::path::Path;
use std::process::Output;

mod common;

fn run(cfg: &Path, args: &[&str]) -> Output {
    common::run_with_config(cfg, args)
}

fn owner(cfg: &Path) -> serde_json::Value {
    let o = run(cfg, &["--json", "owner"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn recovery_tool_is_refused_while_a_new_owner_holds_the_stream() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let cfg = d.path().join("a.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nstore = \"file://{}\"\nmanifest = true\nowner_id = \"a\"\n\
             lease_ttl_ms = 60000\n",
            d.path().join("data-a").display().to_string(),
            store.display()
        ),
    )
    .unwrap();
    let demo = common::small_demo("1000");
    let o = run(&cfg, &demo);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let before = owner(&cfg);
    assert_eq!(
        before["owner"],
        serde_json::Value::Null,
        "a released its lease: {before}"
    );
    let committed = before["committed_segments"].as_u64().unwrap();
    assert!(committed >= 3, "{before}");

    // b takes the stream (a's lease was released at a's clean shutdown).
    let o = run(
        &cfg,
        &[
            "--json",
            "owner",
            "take",
            "--owner-id",
            "b",
            "--ttl-ms",
            "600000",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let held = owner(&cfg);
    assert_eq!(held["owner"], "b");

    // a's recovery tool and a's broker are refused, naming b.
    for args in [&["drain", "--deadline", "5s"][..], &demo[..]] {
        let o = run(&cfg, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_ne!(o.status.code(), Some(0), "{args:?} ran: {err}");
        assert!(err.contains("\"b\""), "{args:?}: {err}");
    }
    // Nothing was published by a: same version, epoch, owner, entries.
    let after = owner(&cfg);
    assert_eq!(
        (
            &after["version"],
            &after["epoch"],
            &after["owner"],
            &after["committed_segments"]
        ),
        (
            &held["version"],
            &held["epoch"],
            &held["owner"],
            &held["committed_segments"]
        )
    );
}

/// A new owner on a fresh data directory continues segment ids above every
/// id the manifest lists: its segments commit next to the old owner's
/// instead of colliding with them (which retried forever).
#[test]
fn a_new_owner_on_a_fresh_data_directory_continues_the_ids() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let cfg = |who: &str| {
        let p = d.path().join(format!("{who}.toml"));
        std::fs::write(
            &p,
            format!(
                "data_dir = {:?}\nstore = \"file://{}\"\nmanifest = true\nowner_id = {who:?}\n\
                 shutdown_deadline_ms = 20000\n",
                d.path().join(format!("data-{who}")).display().to_string(),
                store.display()
            ),
        )
        .unwrap();
        p
    };
    let (a, b) = (cfg("a"), cfg("b"));
    let demo = common::small_demo("1000");
    let o = run(&a, &demo);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let after_a = owner(&a)["committed_segments"].as_u64().unwrap();
    let o = run(&b, &demo);
    assert_eq!(
        o.status.code(),
        Some(0),
        "b's demo did not drain: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let after_b = owner(&b)["committed_segments"].as_u64().unwrap();
    assert!(after_a >= 3, "{after_a}");
    assert_eq!(
        after_b,
        2 * after_a,
        "a's {after_a} and b's segments, all listed"
    );
}

/// `owner release` with `--data-dir` acts as that directory's own id once
/// its lock shows no broker runs on it. A copy of a running broker's data
/// directory (a backup, a copied VM) has the same id and a free lock: the
/// release fenced the running broker. The live lease is now watched for a
/// renewal first; after the broker is killed, the release of its own
/// directory goes through without `--fence-live`.
#[test]
fn a_copy_of_a_running_brokers_directory_does_not_release_its_lease() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let data = d.path().join("data-a");
    let cfg = d.path().join("a.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nstore = \"file://{}\"\nowner_id = \"a\"\nlease_ttl_ms = 3000\n",
            data.display().to_string(),
            store.display()
        ),
    )
    .unwrap();
    let mut broker = std::process::Command::new(env!("CARGO_BIN_EXE_tierindex"))
        .arg("--config")
        .arg(&cfg)
        .args([
            "demo",
            "--segment-items",
            "300",
            "--slots",
            "64",
            "--entries",
            "1000000",
            "--rate",
            "20000",
        ])
        .env_remove("TIERINDEX_DATA_DIR")
        .env_remove("TIERINDEX_STORE")
        .env_remove("TIERINDEX_STREAM")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while owner(&cfg)["owner"] != "a" {
        assert!(
            std::time::Instant::now() < until,
            "the broker never took the stream"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let copy = d.path().join("data-copy");
    // A live directory: a file may go between cp's listing and its copy
    // (a seal's tmp file, a compaction's): copied again, as an operator
    // would.
    let mut copied = false;
    for _ in 0..10 {
        let _ = std::fs::remove_dir_all(&copy);
        let cp = std::process::Command::new("cp")
            .arg("-a")
            .arg(&data)
            .arg(&copy)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        if cp.success() {
            copied = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(copied, "cp -a of the live data directory failed 10 times");
    let _ = std::fs::remove_file(copy.join("LOCK"));
    let o = run(
        &cfg,
        &["--data-dir", copy.to_str().unwrap(), "owner", "release"],
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let still = owner(&cfg);
    broker.kill().unwrap();
    broker.wait().unwrap();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("was renewed while this command watched it") && err.contains("--fence-live"),
        "{err}"
    );
    assert_eq!(
        still["owner"], "a",
        "the running broker kept its lease: {still}"
    );

    // The broker is gone (kill -9, its lease still live): its own directory
    // releases it, no --fence-live needed.
    let o = run(&cfg, &["owner", "release"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(owner(&cfg)["owner"], serde_json::Value::Null);
}

/// A lease whose renewal interval is longer than the watch allows cannot
/// be shown unrenewed: acting on it as the directory's own id is refused
/// (wait for its expiry, or `--fence-live`), never done blind.
#[test]
fn a_lease_too_long_to_watch_is_not_released_blind() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let cfg = d.path().join("a.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nstore = \"file://{}\"\nowner_id = \"a\"\nlease_ttl_ms = 600000\n",
            d.path().join("data-a").display().to_string(),
            store.display()
        ),
    )
    .unwrap();
    let o = run(&cfg, &common::small_demo("1000"));
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run(&cfg, &["owner", "take"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(owner(&cfg)["owner"], "a");
    let o = run(&cfg, &["owner", "release"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("too long to watch") && err.contains("--fence-live"),
        "{err}"
    );
    assert_eq!(owner(&cfg)["owner"], "a");
    let o = run(&cfg, &["owner", "release", "--fence-live"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(owner(&cfg)["owner"], serde_json::Value::Null);
}
