//! Issue 11, "a data directory knows who it is": the CLI's inspect and
//! drain commands use the store recorded in `DATA_DIR/IDENTITY`, refuse
//! another one without `--store-override`, refuse a path that is not a data
//! directory instead of creating one, and refuse to guess the store of a
//! data directory from before identity files.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tierindex::identity::{IDENTITY_FILE, Identity};
use tierindex::lifecycle::{EXIT_DRAINED, EXIT_ERROR, EXIT_NEEDS_OPERATOR};
use tierindex::{Config, TierIndex};

fn tierindex(args: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_tierindex"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TIERINDEX_LOG", "warn")
        .args(args)
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

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A broker on `store` (not the default store) left sealed segments
/// pending: its store is unreachable at the end (a dead loopback port is not
/// needed: we simply never drain).
async fn broker_with_pending(data: &Path, store: &Path) {
    broker_with_pending_in(data, store, true).await
}

/// [`broker_with_pending`] in manifest mode or not.
async fn broker_with_pending_in(data: &Path, store: &Path, manifest: bool) {
    let cfg = Config {
        data_dir: data.to_path_buf(),
        store: Some(format!("file://{}", store.display())),
        stream: "orders".into(),
        segment_items: 20,
        slot_count: 16,
        segment_max_age_ms: None,
        manifest,
        ..Config::default()
    };
    let (ti, _) = TierIndex::open(cfg).await.unwrap();
    for o in 0..50u64 {
        ti.append(b"k", o, 1, 1_700_000_000_000 + o).unwrap();
    }
    ti.flush().unwrap();
    // Drop without shutdown: a crash; the segments stay pending.
    drop(ti);
    wait_unlocked(data).await;
}

/// A dropped index's sealer thread holds the data directory's lock until
/// it has finished what was queued: wait for it (a fixed sleep is not
/// enough on a loaded machine).
async fn wait_unlocked(data: &Path) {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tierindex::datadir::DataDir::open(data) {
            Ok(dd) => return drop(dd),
            Err(e) if std::time::Instant::now() < until => {
                assert_eq!(e.kind(), tierindex::ErrorKind::Locked, "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("still locked after 30 s: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_without_store_uses_the_recorded_store_and_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, store) = (tmp.path().join("data"), tmp.path().join("bucket"));
    broker_with_pending(&data, &store).await;
    let id = Identity::load(&data).unwrap().expect("written at open");
    assert_eq!(id.stream, "orders");
    assert_eq!(id.store, format!("file://{}", store.display()));

    let (code, out) = tierindex(&["--data-dir", s(&data), "drain", "--deadline", "30s"]);
    assert_eq!(code, EXIT_DRAINED, "{out}");
    // Uploaded to the recorded store under the recorded stream, not into a
    // default `tierindex-store` next to the data directory.
    assert!(!tmp.path().join("tierindex-store").exists(), "{out}");
    let n = std::fs::read_dir(store.join("orders").join("segments"))
        .unwrap()
        .count();
    assert!(n >= 2, "{n}");

    // Another store is refused without --store-override, and nothing is
    // created for it.
    let other = tmp.path().join("other");
    let url = format!("file://{}", other.display());
    let (code, out) = tierindex(&["--data-dir", s(&data), "--store", &url, "verify"]);
    assert_eq!(code, EXIT_ERROR, "{out}");
    assert!(out.contains("--store-override"), "{out}");
    assert!(!other.exists());
    let (code, out) = tierindex(&[
        "--data-dir",
        s(&data),
        "--store",
        &url,
        "--store-override",
        "status",
    ]);
    assert_eq!(code, EXIT_DRAINED, "{out}");
}

/// `demo --store-override --stream X` without --store (meant to change the
/// stream only) on a data directory created for another store than the
/// default one went to the default store beside the data directory: it is
/// refused with what to pass, and with --store it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_override_without_store_does_not_switch_stores_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, store) = (tmp.path().join("data"), tmp.path().join("bucket"));
    broker_with_pending_in(&data, &store, false).await;
    let demo = |store: Option<&str>| {
        let mut args = vec!["--data-dir", s(&data)];
        if let Some(st) = store {
            args.extend(["--store", st]);
        }
        args.extend([
            "--stream",
            "payments",
            "--store-override",
            "demo",
            "--entries",
            "300",
            "--segment-items",
            "100",
            "--slots",
            "16",
        ]);
        tierindex(&args)
    };
    let (code, out) = demo(None);
    assert_eq!(code, EXIT_ERROR, "{out}");
    assert!(
        out.contains("--store-override without --store") && out.contains("pass --store"),
        "{out}"
    );
    let url = format!("file://{}", store.display());
    let (code, out) = demo(Some(&url));
    assert_eq!(code, EXIT_DRAINED, "{out}");
    assert!(!tmp.path().join("tierindex-store").exists(), "{out}");
    let n = std::fs::read_dir(store.join("payments").join("segments"))
        .unwrap()
        .count();
    assert!(n >= 3, "{n}: {out}");
}

/// The library's own open (what a broker calls), not only the CLI's
/// inspecting commands: a data directory copied elsewhere (its default
/// store would move with it), or opened with another stream or store, is
/// refused before anything is written or created, unless overridden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_refuses_another_store_or_stream_unless_overridden() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, store) = (tmp.path().join("data"), tmp.path().join("bucket"));
    // Single-writer mode: in manifest mode the copy is another owner, and
    // the crashed original's lease would hold it off for its TTL.
    broker_with_pending_in(&data, &store, false).await;
    let recorded = std::fs::read(data.join(IDENTITY_FILE)).unwrap();
    let copy = tmp.path().join("elsewhere").join("data");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    let o = Command::new("cp")
        .args(["-a", s(&data), s(&copy)])
        .output()
        .unwrap();
    assert!(o.status.success());
    let cfg = |dir: &Path, store: Option<String>, stream: &str| Config {
        data_dir: dir.to_path_buf(),
        store,
        stream: stream.into(),
        segment_items: 20,
        slot_count: 16,
        segment_max_age_ms: None,
        manifest: false,
        ..Config::default()
    };
    let url = format!("file://{}", store.display());
    let cases = [
        // The copy with the default store (next to the copy).
        (cfg(&copy, None, "orders"), "store"),
        // A typo in the store, and another stream.
        (
            cfg(
                &data,
                Some(format!("file://{}", tmp.path().join("bucke").display())),
                "orders",
            ),
            "store",
        ),
        (cfg(&data, Some(url.clone()), "order"), "stream"),
    ];
    for (c, what) in cases {
        let e = match TierIndex::open(c.clone()).await {
            Ok(_) => panic!("{what}: opened {c:?}"),
            Err(e) => e,
        };
        assert_eq!(e.kind(), tierindex::ErrorKind::InvalidInput, "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("created for {what}")), "{msg}");
        assert!(msg.contains("store_override"), "{msg}");
        assert!(!msg.contains("secret"), "{msg}");
    }
    // Nothing was created for the refused stores, nothing rewritten.
    assert!(
        !tmp.path()
            .join("elsewhere")
            .join("tierindex-store")
            .exists()
    );
    assert!(!tmp.path().join("bucke").exists());
    assert_eq!(std::fs::read(data.join(IDENTITY_FILE)).unwrap(), recorded);
    assert_eq!(std::fs::read(copy.join(IDENTITY_FILE)).unwrap(), recorded);

    // The copy naming the recorded store opens (and may drain there).
    let (ti, _) = TierIndex::open(cfg(&copy, Some(url.clone()), "orders"))
        .await
        .unwrap();
    drop(ti);
    wait_unlocked(&copy).await;
    // Overridden on purpose to a store directory that does not exist: a
    // mistyped path is refused, and nothing is created.
    let other = tmp.path().join("other");
    let e = TierIndex::open(Config {
        store_override: true,
        ..cfg(&data, Some(format!("file://{}", other.display())), "orders")
    })
    .await
    .err()
    .expect("refused");
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert!(!other.exists());
    wait_unlocked(&data).await;
    // To one that exists: opens, and IDENTITY keeps what it recorded.
    std::fs::create_dir(&other).unwrap();
    let (ti, _) = TierIndex::open(Config {
        store_override: true,
        ..cfg(&data, Some(format!("file://{}", other.display())), "orders")
    })
    .await
    .unwrap();
    drop(ti);
    wait_unlocked(&data).await;
    assert_eq!(std::fs::read(data.join(IDENTITY_FILE)).unwrap(), recorded);

    // Credentials in the named store are never echoed (the URL is refused
    // as it is parsed, before any comparison).
    let e = match TierIndex::open(cfg(
        &data,
        Some("s3://AKIAX:SECRETxyz@bkt/p".into()),
        "orders",
    ))
    .await
    {
        Ok(_) => panic!("opened with credentials in the URL"),
        Err(e) => e,
    };
    assert!(!e.to_string().contains("SECRETxyz"), "{e}");

    // A path holding `#`, `%` or `?` (recorded as a plain path) is the
    // same store at every open: the default store beside such a directory.
    let odd = tmp.path().join("a#b%41?c").join("data");
    let c = cfg(&odd, None, "orders");
    for _ in 0..2 {
        let (ti, _) = TierIndex::open(c.clone())
            .await
            .expect("reopen of an odd path");
        drop(ti);
        wait_unlocked(&odd).await;
    }
    // ... and a store at a prefix of that path is another store.
    let prefix = format!("file://{}", tmp.path().join("a").display());
    let e = match TierIndex::open(cfg(&odd, Some(prefix), "orders")).await {
        Ok(_) => panic!("a different store was taken for the recorded one"),
        Err(e) => e,
    };
    assert!(e.to_string().contains("created for store"), "{e}");

    // The CLI's own running commands get the same refusal, and
    // --store-override lets them through.
    let (code, out) = tierindex(&[
        "--data-dir",
        s(&copy),
        "--stream",
        "orders",
        "demo",
        "--entries",
        "10",
    ]);
    assert_eq!(code, EXIT_ERROR, "{out}");
    assert!(out.contains("--store-override"), "{out}");
}

#[test]
fn a_path_that_is_not_a_data_directory_is_refused_not_created() {
    let tmp = tempfile::tempdir().unwrap();
    let nope = tmp.path().join("typo");
    for cmd in [
        &["verify"][..],
        &["status"],
        &["drain"],
        &["fsck"],
        &["reconcile"],
    ] {
        let mut args = vec!["--data-dir", s(&nope)];
        args.extend_from_slice(cmd);
        let (code, out) = tierindex(&args);
        assert_eq!(code, EXIT_ERROR, "{cmd:?}: {out}");
        assert!(
            out.contains("not a tierindex data directory"),
            "{cmd:?}: {out}"
        );
        assert!(!nope.exists(), "{cmd:?} created it");
        assert!(!tmp.path().join("tierindex-store").exists(), "{cmd:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_without_identity_needs_an_explicit_store() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, store) = (tmp.path().join("data"), tmp.path().join("bucket"));
    broker_with_pending(&data, &store).await;
    // As written by a build from before identity files.
    std::fs::remove_file(data.join(IDENTITY_FILE)).unwrap();
    let (code, out) = tierindex(&["--data-dir", s(&data), "drain"]);
    assert_eq!(code, EXIT_ERROR, "{out}");
    assert!(out.contains("pass --store"), "{out}");
    assert!(!tmp.path().join("tierindex-store").exists());
    // fsck does not need a store.
    let (code, out) = tierindex(&["--data-dir", s(&data), "fsck"]);
    assert_ne!(code, EXIT_ERROR, "{out}");
    // With --store the broker path writes the identity, with a new
    // incarnation: this directory can no longer show it is the one whose
    // crashed broker holds the stream's lease (its default owner id hashes
    // the incarnation), so the drain is refused while that lease lasts,
    // naming the holder and when it ends.
    let url = format!("file://{}", store.display());
    let at = [
        "--data-dir",
        s(&data),
        "--store",
        &url,
        "--stream",
        "orders",
    ];
    let drain = [&at[..], &["drain"]].concat();
    let (code, out) = tierindex(&drain);
    assert_eq!(code, EXIT_ERROR, "{out}");
    assert!(
        out.contains("is held by owner") && out.contains("until"),
        "{out}"
    );
    // The operator releases the crashed broker's lease (or waits for it).
    let holder = out
        .split("owner \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("the holder named")
        .to_string();
    // Without the data directory's lock to show its broker is down (its id
    // is not this directory's any more), the live holder is not released
    // by a bare id: the operator says it is gone.
    let release = [&at[..], &["owner", "release", "--owner-id", &holder]].concat();
    let (code, out) = tierindex(&release);
    assert_eq!(code, EXIT_ERROR, "{out}");
    assert!(out.contains("--fence-live"), "{out}");
    let (code, out) = tierindex(&[&release[..], &["--fence-live"]].concat());
    assert_eq!(code, 0, "{out}");
    let (code, out) = tierindex(&drain);
    assert_eq!(code, EXIT_DRAINED, "{out}");
    let id = Identity::load(&data)
        .unwrap()
        .expect("written by the drain's open");
    assert_eq!(
        (id.stream.as_str(), id.store.as_str()),
        ("orders", url.as_str())
    );
}

/// The mode is recorded too: a single-writer data directory is drained in
/// single-writer mode without `--manifest`, `--manifest true` is refused
/// with what to do, and `--switch-mode` switches on purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_uses_the_recorded_mode_and_refuses_the_other_one() {
    use tierindex::identity::Mode;
    let tmp = tempfile::tempdir().unwrap();
    let (data, store) = (tmp.path().join("data"), tmp.path().join("bucket"));
    broker_with_pending_in(&data, &store, false).await;
    assert_eq!(
        Identity::load(&data).unwrap().unwrap().mode,
        Some(Mode::SingleWriter)
    );

    // The other mode, asked for: refused, nothing uploaded.
    let (code, out) = tierindex(&[
        "--data-dir",
        s(&data),
        "--manifest",
        "true",
        "drain",
        "--deadline",
        "30s",
    ]);
    assert_eq!(code, EXIT_ERROR, "{out}");
    assert!(
        out.contains("single-writer mode") && out.contains("--switch-mode"),
        "{out}"
    );
    assert!(!store.join("orders").join("manifest").exists(), "{out}");

    // No flag: the recorded mode; the drain commits without a manifest.
    let (code, out) = tierindex(&["--data-dir", s(&data), "drain", "--deadline", "30s"]);
    assert_eq!(code, EXIT_DRAINED, "{out}");
    assert!(!store.join("orders").join("manifest").exists(), "{out}");

    // Switched on purpose: recorded.
    let (code, out) = tierindex(&[
        "--data-dir",
        s(&data),
        "--manifest",
        "true",
        "--switch-mode",
        "drain",
        "--deadline",
        "30s",
    ]);
    // The segments committed in single-writer mode are not in the new
    // manifest: said, exit 4, until `reconcile --repair` adds them.
    assert_eq!(code, EXIT_NEEDS_OPERATOR, "{out}");
    assert!(out.contains("NOT IN THE MANIFEST"), "{out}");
    assert_eq!(
        Identity::load(&data).unwrap().unwrap().mode,
        Some(Mode::Manifest)
    );
    let (code, out) = tierindex(&["--data-dir", s(&data), "reconcile", "--repair"]);
    assert!(code == EXIT_DRAINED || code == EXIT_NEEDS_OPERATOR, "{out}");
    let (code, out) = tierindex(&["--data-dir", s(&data), "drain", "--deadline", "30s"]);
    assert_eq!(code, EXIT_DRAINED, "{out}");
}
