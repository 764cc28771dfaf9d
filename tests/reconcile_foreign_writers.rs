//! Issue 11, "deletion needs proof": the reconciler (standalone
//! `reconcile --repair` and the in-process background run) on a store that
//! holds objects this data directory did not write.
//!
//! - A data directory lost and re-created on the same stream: the new one
//!   numbers its segments from 1 again; the old directory's committed
//!   objects (with `release_after_commit`, the only copy) must survive.
//! - Two data directories on one store and the default stream `stream-0`:
//!   nothing of the other directory is deleted, and the report says what it
//!   found and what to do.
//!
//! Single-writer mode (`manifest = false`, chosen explicitly: the default,
//! the remote manifest, refuses a second live writer and lets a re-created
//! directory continue above the stream's ids; see `tests/safe_defaults.rs`),
//! where a new directory numbers its segments from 1 again.
//! Single-writer mode never deletes an object.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use tierindex::lifecycle::EXIT_NEEDS_OPERATOR;
use tierindex::recovery::reconcile::{FindingKind, ReconcileOptions, reconcile};
use tierindex::{Config, TierIndex};

const ITEMS: u32 = 40;

fn config(data: &Path, store: &Path) -> Config {
    Config {
        data_dir: data.to_path_buf(),
        store: Some(format!("file://{}", store.display())),
        segment_items: ITEMS,
        slot_count: 64,
        segment_max_age_ms: None,
        tick_ms: 20,
        max_attempts: 3,
        request_timeout_ms: 5000,
        release_after_commit: true,
        manifest: false,
        ..Config::default()
    }
}

/// Opens `cfg`, appends `n` entries from `first_offset`, drains.
async fn fill(cfg: &Config, first_offset: u64, n: u64) {
    let (ti, _) = TierIndex::open(cfg.clone()).await.unwrap();
    for o in first_offset..first_offset + n {
        ti.append(
            format!("k{}", o % 11).as_bytes(),
            o,
            100,
            1_700_000_000_000 + o,
        )
        .unwrap();
    }
    ti.flush().unwrap();
    let r = ti.shutdown(Duration::from_secs(30)).await;
    assert!(r.fully_drained(), "{r:?}");
}

/// Every segment object of the default stream, with its bytes.
fn objects(store: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let dir = store.join("stream-0").join("segments");
    common::files_under(&dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .map(|p| {
            let bytes = std::fs::read(dir.join(&p)).unwrap();
            (p, bytes)
        })
        .collect()
}

/// Makes every object under the stream look two hours old (past any grace).
fn age_objects(store: &Path) {
    let dir = store.join("stream-0").join("segments");
    for p in common::files_under(&dir) {
        let f = std::fs::File::options()
            .write(true)
            .open(dir.join(p))
            .unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
    }
}

fn cli_reconcile(data: &Path, store: &Path) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_tierindex"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TIERINDEX_LOG", "warn")
        .arg("--data-dir")
        .arg(data)
        .arg("--store")
        .arg(format!("file://{}", store.display()))
        // The mode these data directories ran in (the CLI's default is the
        // manifest, which would rebuild one from the listed objects).
        .args(["--manifest", "false"])
        .args(["reconcile", "--repair", "--grace-ms", "0"])
        .output()
        .expect("run tierindex");
    (
        o.status.code().expect("exit code"),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// The other writer's objects are all still there, byte for byte, and the
/// standalone repair (library and CLI) deleted nothing and says so.
async fn assert_nothing_of_theirs_deleted(
    cfg: &Config,
    store_dir: &Path,
    theirs: &BTreeMap<PathBuf, Vec<u8>>,
) {
    age_objects(store_dir);
    let store = tierindex::tier::open_store(cfg).unwrap();
    let opts = ReconcileOptions {
        repair: true,
        grace: Duration::ZERO,
        deep: false,
        ..Default::default()
    };
    let r = reconcile(cfg, &store, &opts).await.unwrap();
    assert_eq!(r.deleted, 0, "{:#?}", r.findings);
    assert!(r.needs_operator(), "{:#?}", r.findings);
    let orphans: Vec<_> = r
        .findings
        .iter()
        .filter(|f| f.kind == FindingKind::Orphan)
        .collect();
    assert!(!orphans.is_empty(), "{:#?}", r.findings);
    for f in &orphans {
        assert!(!f.deleted && !f.repaired, "{f:?}");
        assert!(f.action.contains("never deleted"), "{f:?}");
    }
    let (code, out) = cli_reconcile(&cfg.data_dir, store_dir);
    assert_eq!(code, EXIT_NEEDS_OPERATOR, "{out}");
    assert!(out.contains("unknown origin"), "{out}");
    assert!(!out.contains("fixed"), "{out}");
    let now = objects(store_dir);
    for (k, bytes) in theirs {
        assert_eq!(
            now.get(k),
            Some(bytes),
            "{} was deleted or changed",
            k.display()
        );
    }
}

/// Opens `cfg` with the background reconciler repairing every 100 ms past a
/// 1 s grace, lets it run several times, and checks nothing of theirs went.
async fn background_reconciler_keeps(
    cfg: &Config,
    store_dir: &Path,
    theirs: &BTreeMap<PathBuf, Vec<u8>>,
) {
    age_objects(store_dir);
    let cfg = Config {
        reconcile_interval_ms: 100,
        reconcile_repair: true,
        reconcile_grace_ms: 1_000,
        ..cfg.clone()
    };
    let (ti, _) = TierIndex::open(cfg).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let now = objects(store_dir);
    let _ = ti.shutdown(Duration::from_secs(10)).await;
    for (k, bytes) in theirs {
        assert_eq!(
            now.get(k),
            Some(bytes),
            "{} was deleted or changed",
            k.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_and_recreated_data_directory_deletes_nothing_of_the_old_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, store_dir) = (tmp.path().join("data"), tmp.path().join("store"));
    let cfg = config(&data, &store_dir);
    fill(&cfg, 0, ITEMS as u64 * 5).await;
    let old = objects(&store_dir);
    assert!(old.len() >= 5, "{old:?}");
    // With release_after_commit, the objects are the only copy.
    assert!(common::local_sealed_ids(&data).is_empty());

    // The disk is lost; a new data directory on the same stream starts
    // from segment 1 again (single-writer mode does not move ids above the
    // listed objects).
    std::fs::remove_dir_all(&data).unwrap();
    fill(&cfg, 10_000, ITEMS as u64 * 3).await;
    let all = objects(&store_dir);
    assert!(all.len() > old.len(), "the new directory uploaded too");

    assert_nothing_of_theirs_deleted(&cfg, &store_dir, &old).await;
    background_reconciler_keeps(&cfg, &store_dir, &old).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_data_directories_on_one_stream_delete_nothing_of_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let a = config(&tmp.path().join("a"), &store_dir);
    let b = config(&tmp.path().join("b"), &store_dir);
    assert_eq!(a.stream, "stream-0");
    fill(&a, 0, ITEMS as u64 * 3).await;
    let of_a = objects(&store_dir);
    // B writes more segments than A, so its journal's ids cover A's: A's
    // objects are other seals of ids B knows.
    fill(&b, 50_000, ITEMS as u64 * 6).await;
    let of_b: BTreeMap<_, _> = objects(&store_dir)
        .into_iter()
        .filter(|(k, _)| !of_a.contains_key(k))
        .collect();
    assert!(!of_b.is_empty());

    assert_nothing_of_theirs_deleted(&b, &store_dir, &of_a).await;
    assert_nothing_of_theirs_deleted(&a, &store_dir, &of_b).await;
    background_reconciler_keeps(&b, &store_dir, &of_a).await;
    background_reconciler_keeps(&a, &store_dir, &of_b).await;
}
