//! What the CLI's reports say, against the embedded `file://` store: what
//! readers through the manifest see counts, not only the objects (verify);
//! counts that could not be made are not given as 0 (status); offsets
//! that would wrap are refused (demo).

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
        .env_remove("TIERINDEX_MANIFEST")
        .args(args)
        .output()
        .expect("run tierindex")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// helper-82 F7: with the stream's manifest gone from the store, `verify`
/// said "10 checked, 10 ok", exit 0, while readers through the manifest
/// found none of the committed segments and the broker refused to open.
/// Now it names the missing manifest and exits 4; so does a manifest
/// rolled back to a version that lists fewer segments than the journal
/// committed.
#[test]
fn verify_names_a_missing_or_short_manifest() {
    let d = tempfile::tempdir().unwrap();
    let o = run(
        d.path(),
        &[
            "demo",
            "--entries",
            "20000",
            "--rate",
            "1000000",
            "--segment-items",
            "2000",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = run(d.path(), &["verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let versions = d.path().join("store/stream-0/manifest/versions");
    let mut names: Vec<std::path::PathBuf> = std::fs::read_dir(&versions)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    assert!(names.len() > 2, "{names:?}");
    // Rolled back: the newest versions gone (the first lists fewer).
    let aside = d.path().join("aside");
    std::fs::create_dir_all(&aside).unwrap();
    for p in &names[names.len() / 2..] {
        std::fs::rename(p, aside.join(p.file_name().unwrap())).unwrap();
    }
    let o = run(d.path(), &["verify"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("the manifest does not list"),
        "{}",
        text(&o)
    );
    // Gone altogether.
    std::fs::remove_dir_all(d.path().join("store/stream-0/manifest")).unwrap();
    let o = run(d.path(), &["verify"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("the store has no manifest for the stream"),
        "{}",
        text(&o)
    );
}

/// helper-82 F4: a local file that could not be read was counted as 0
/// entries (after an I/O error a report said 0 unsealed entries while
/// 29,600 acknowledged ones sat in active files). `status` names it and
/// exits 4.
#[test]
fn status_names_an_active_file_it_cannot_read() {
    let d = tempfile::tempdir().unwrap();
    let o = run(
        d.path(),
        &["demo", "--entries", "5000", "--rate", "1000000"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = run(d.path(), &["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // Something under an active file's name that cannot be read as one.
    let bad = d.path().join("data/segments/00000000000000009999.active");
    std::fs::create_dir(&bad).unwrap();
    let o = run(d.path(), &["status"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("CANNOT READ"), "{}", text(&o));
    assert!(
        text(&o).contains("00000000000000009999.active"),
        "{}",
        text(&o)
    );
    let o = run(d.path(), &["--json", "status"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        v["totals"]["unreadable_local"].as_array().map(Vec::len),
        Some(1),
        "{v}"
    );
}

/// helper-82 F6: a data directory whose highest offset is u64::MAX made
/// the next `demo` start again at offset 0 (`max + 1` wrapped). It now
/// stops before appending, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_refuses_to_wrap_past_the_last_offset() {
    let d = tempfile::tempdir().unwrap();
    let cfg = tierindex::Config {
        data_dir: d.path().join("data"),
        store: Some(format!("file://{}", d.path().join("store").display())),
        ..tierindex::Config::default()
    };
    let (ti, _) = tierindex::TierIndex::open(cfg).await.unwrap();
    ti.append(b"key-0", u64::MAX, 100, 1_700_000_000_000)
        .unwrap();
    ti.flush().unwrap();
    let r = ti.shutdown(std::time::Duration::from_secs(20)).await;
    assert!(r.fully_drained(), "{r:?}");
    let dir = d.path().to_path_buf();
    let o = tokio::task::spawn_blocking(move || {
        run(
            &dir,
            &[
                "demo",
                "--entries",
                "10",
                "--rate",
                "1000000",
                "--print-flushed",
            ],
        )
    })
    .await
    .unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("offset u64::MAX"), "{}", text(&o));
    assert!(!text(&o).contains("start 0"), "{}", text(&o));
    assert!(text(&o).contains("start none left"), "{}", text(&o));
}

/// helper-82 F5: in single-writer mode with `release_after_commit`, a lost
/// `journal.log` went unnoticed: fsck and drain exited 0, and the next run
/// started a new journal that reused the store's ids while `lookup
/// --remote` found none of the released segments. Now fsck says the
/// journal is missing (exit 4) and the open refuses, naming the way out;
/// with the journal rebuilt (`fsck --repair`) it opens again.
#[test]
fn a_lost_journal_is_named_not_replaced_in_single_writer_mode() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("cfg.toml");
    std::fs::write(&cfg, "release_after_commit = true\nmanifest = false\n").unwrap();
    let c = cfg.to_str().unwrap();
    let o = small_demo(d.path(), c, "2000");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    std::fs::remove_file(d.path().join("data/journal/journal.log")).unwrap();
    let o = run(d.path(), &["fsck", "--config", c]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let o = run(d.path(), &["drain", "--config", c]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("journal of"), "{}", text(&o));
    assert!(text(&o).contains("is missing"), "{}", text(&o));
    assert!(!d.path().join("data/journal/journal.log").exists());
    let o = run(d.path(), &["fsck", "--repair", "--config", c]);
    assert!(matches!(o.status.code(), Some(0 | 3 | 4)), "{}", text(&o));
    // The segments were released after their commit: the store holds
    // them, and the acknowledged-segment mark, which the rebuilt journal
    // cannot account for, does not call the newest one LOST (helper-89 F1).
    for cmd in ["status", "fsck"] {
        let o = run(d.path(), &[cmd, "--config", c]);
        assert!(!text(&o).contains("LOST"), "{cmd}: {}", text(&o));
    }
    let o = run(d.path(), &["drain", "--config", c]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // The rebuilt journal is empty (every local copy was released): new
    // ids continue above the store's, none is given out twice (helper-84
    // F4: a second object under id 1).
    let o = small_demo(d.path(), c, "1000");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let mut ids: Vec<String> = std::fs::read_dir(d.path().join("store/stream-0/segments"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy()[..20].to_string())
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "an id with two objects: {ids:?}");
    assert!(n > 10, "{ids:?}");
}

/// helper-81 F2: a first open refused by another owner's live lease
/// leaves an empty tree without `IDENTITY`; the refusal's advice named
/// neither the store nor the stream, and `drain` there then said the
/// directory "was created before identity files", false for one made a
/// moment ago.
#[test]
fn a_refused_first_open_says_what_to_do_and_what_it_left() {
    let d = tempfile::tempdir().unwrap();
    let o = run(
        d.path(),
        &["owner", "take", "--owner-id", "other", "--ttl-ms", "600000"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = run(d.path(), &["demo", "--entries", "100", "--rate", "1000000"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let store = format!("--store 'file://{}'", d.path().join("store").display());
    assert!(text(&o).contains(&store), "{}", text(&o));
    assert!(text(&o).contains("--stream 'stream-0'"), "{}", text(&o));
    let o = Command::new(env!("CARGO_BIN_EXE_tierindex"))
        .env_remove("TIERINDEX_STORE")
        .env_remove("TIERINDEX_CONFIG")
        .env_remove("TIERINDEX_STREAM")
        .env_remove("TIERINDEX_MANIFEST")
        .args(["drain", "--data-dir"])
        .arg(d.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("holds no segment"), "{}", text(&o));
    assert!(!text(&o).contains("before identity files"), "{}", text(&o));
}

/// helper-81 F1, helper-84 F1: a default-mode broker beside a recent
/// single-writer broker of the stream is refused, and the way past it
/// that the refusal prints works: `owner release` writes the stream's
/// manifest with no owner, which the broker's next start takes.
#[test]
fn the_way_past_a_single_writer_refusal_works() {
    let d = tempfile::tempdir().unwrap();
    let store = format!("file://{}", d.path().join("store").display());
    let at = |dir: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tierindex"))
            .env_remove("TIERINDEX_CONFIG")
            .env_remove("TIERINDEX_STREAM")
            .env_remove("TIERINDEX_MANIFEST")
            .env_remove("TIERINDEX_DATA_DIR")
            .env("TIERINDEX_STORE", &store)
            .arg("--data-dir")
            .arg(d.path().join(dir))
            .args(args)
            .output()
            .unwrap()
    };
    let demo = [
        "demo",
        "--entries",
        "3000",
        "--rate",
        "1000000",
        "--segment-items",
        "500",
    ];
    let mut single = vec!["--manifest", "false"];
    single.extend_from_slice(&demo);
    let o = at("a", &single);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = at("b", &demo);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("single-writer mode"), "{}", text(&o));
    assert!(
        text(&o).contains("owner release --owner-id operator"),
        "{}",
        text(&o)
    );
    let o = Command::new(env!("CARGO_BIN_EXE_tierindex"))
        .env_remove("TIERINDEX_CONFIG")
        .env_remove("TIERINDEX_DATA_DIR")
        .args(["owner", "release", "--owner-id", "operator", "--fence-live"])
        .args(["--store", &store, "--stream", "stream-0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = at("b", &demo);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// `demo` with the config `c`, segments of 200 items, 16 slots, `entries`
/// entries at up to 1,000,000 a second.
fn small_demo(dir: &std::path::Path, c: &str, entries: &str) -> Output {
    run(
        dir,
        &[
            "demo",
            "--config",
            c,
            "--segment-items",
            "200",
            "--slots",
            "16",
            "--entries",
            entries,
            "--rate",
            "1000000",
        ],
    )
}

/// Recursive copy of a `file://` store (a backup taken, or put back).
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// helper-81 F6: a store restored from an older backup (objects and
/// manifest rolled back) under `release_after_commit`: the segments
/// committed since are gone from the store and from this data directory.
/// Every command said so (exit 4), but `--accept-loss` refused them (the
/// restored manifest does not list them), so nothing ever ended the exit 4
/// and the advice printed named a step that did not work. Now reconcile
/// names each loss by segment, entry count and offsets and prints the
/// acceptance that works; `--repair` lists them in the manifest marked
/// LOST (exit still 4: accepting is the operator's step), and the printed
/// acceptance ends in exit 0 from every command, nothing deleted.
#[test]
fn a_loss_to_a_restored_store_is_named_and_can_be_accepted() {
    let d = tempfile::tempdir().unwrap();
    let (c, store) = store_restored_after_a_second_demo(d.path(), || {});
    let c = c.as_str();
    let objects = || {
        std::fs::read_dir(store.join("stream-0/segments"))
            .unwrap()
            .count()
    };
    let before = objects();

    // Every command says 4; reconcile names the loss and the way past it.
    for args in [&["status", "--remote"][..], &["verify"], &["drain"]] {
        let o = run(d.path(), &[args, &["--config", c]].concat());
        assert_eq!(o.status.code(), Some(4), "{args:?}: {}", text(&o));
    }
    let o = run(d.path(), &["reconcile", "--config", c]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains("its 200 entries, offsets 400..=599"), "{out}");
    assert!(out.contains("its 200 entries, offsets 600..=799"), "{out}");
    let next = out
        .lines()
        .find(|l| l.starts_with("next: 2 segment(s) LOST"))
        .unwrap_or_else(|| panic!("no advice: {out}"));
    let start = next.find("`tierindex reconcile --repair --deep").unwrap() + 1;
    let cmd = &next[start..start + next[start..].find('`').unwrap()];
    let ids: Vec<&str> = cmd
        .split_whitespace()
        .skip_while(|w| *w != "--accept-loss")
        .take_while(|w| *w != "--reason")
        .filter(|w| *w != "--accept-loss")
        .collect();
    assert_eq!(ids.len(), 2, "{cmd}");

    // --repair alone lists them marked LOST, and accepts nothing.
    let o = run(d.path(), &["reconcile", "--repair", "--config", c]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("marked LOST"), "{}", text(&o));
    let o = run(d.path(), &["status", "--remote", "--config", c]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("| LOST |"), "{}", text(&o));

    // The printed acceptance works.
    let mut accept: Vec<&str> = cmd.split_whitespace().skip(1).collect();
    let last = accept.len() - 1;
    accept[last] = "restored from the backup of the day before";
    accept.extend(["--config", c]);
    let o = run(d.path(), &accept);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("2 accepted loss(es)"), "{}", text(&o));
    for args in [
        &["status", "--remote"][..],
        &["verify"],
        &["reconcile", "--deep"],
        &["drain"],
    ] {
        let o = run(d.path(), &[args, &["--config", c]].concat());
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o));
        assert!(
            text(&o).to_lowercase().contains("accepted"),
            "{args:?} names the accepted loss: {}",
            text(&o)
        );
    }
    assert_eq!(objects(), before, "nothing deleted");
}

/// helper-88: the loss of the test above, once the journal was compacted
/// before anyone ran reconcile. Compaction dropped every `Released`
/// record (all four segments were released), so the journal held nothing
/// of the segments the restored store lost: `status`, `verify`, `drain`
/// and `reconcile` all said 0 while 400 committed entries were gone.
/// Compaction now keeps the newest released segment's record: the loss
/// is reported (exit 4) by that segment's entries and offsets, with the
/// offsets below it that the compacted-out segments held (neither the
/// manifest nor the store holds them), and the acceptance printed works.
#[test]
fn a_loss_to_a_restored_store_is_named_after_the_journal_was_compacted() {
    let d = tempfile::tempdir().unwrap();
    let (c, store) = store_restored_after_a_second_demo(d.path(), || {
        // The journal compacted (as the broker's committer does once it is
        // large enough) before the store is restored.
        {
            let (mut j, _) =
                tierindex::journal::Journal::open(&d.path().join("data"), Default::default())
                    .unwrap();
            let ids: Vec<_> = j.segments().keys().copied().collect();
            assert_eq!(ids.len(), 4, "{ids:?}");
            j.compact().unwrap();
            // Segments 1 to 3 (offsets 0..=599) are gone from the journal
            // (the old code dropped the fourth too).
            assert!(ids[..3].iter().all(|id| j.get(*id).is_none()));
        }
    });
    let c = c.as_str();
    let objects = || {
        std::fs::read_dir(store.join("stream-0/segments"))
            .unwrap()
            .count()
    };
    let before = objects();

    for args in [&["status", "--remote"][..], &["verify"], &["drain"]] {
        let o = run(d.path(), &[args, &["--config", c]].concat());
        assert_eq!(o.status.code(), Some(4), "{args:?}: {}", text(&o));
    }
    let o = run(d.path(), &["reconcile", "--config", c]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains("its 200 entries, offsets 600..=799"), "{out}");
    assert!(out.contains("offsets 400..=599"), "{out}");
    let next = out
        .lines()
        .find(|l| l.starts_with("next: 1 segment(s) LOST"))
        .unwrap_or_else(|| panic!("no advice: {out}"));
    let start = next.find("`tierindex reconcile --repair --deep").unwrap() + 1;
    let cmd = &next[start..start + next[start..].find('`').unwrap()];

    let o = run(d.path(), &["reconcile", "--repair", "--config", c]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("marked LOST"), "{}", text(&o));
    let o = run(d.path(), &["status", "--remote", "--config", c]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));

    let mut accept: Vec<&str> = cmd.split_whitespace().skip(1).collect();
    let last = accept.len() - 1;
    accept[last] = "restored from the backup of the day before";
    accept.extend(["--config", c]);
    let o = run(d.path(), &accept);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    for args in [
        &["status", "--remote"][..],
        &["verify"],
        &["reconcile", "--deep"],
        &["drain"],
    ] {
        let o = run(d.path(), &[args, &["--config", c]].concat());
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o));
        // The accepted loss names the offsets below the kept segment too.
        if args[0] == "reconcile" {
            assert!(text(&o).contains("400..=599"), "{}", text(&o));
        }
    }
    assert_eq!(objects(), before, "nothing deleted");
}

/// Two demos of 400 entries each under `release_after_commit` (segments of
/// 200), the store copied aside between them; `between` runs after the
/// second, then the store is put back as it was after the first: the
/// second demo's committed (and released) segments are gone from the
/// store and from the data directory. Returns the config's path and the
/// store's.
fn store_restored_after_a_second_demo(
    dir: &std::path::Path,
    between: impl FnOnce(),
) -> (String, std::path::PathBuf) {
    let cfg = dir.join("cfg.toml");
    std::fs::write(&cfg, "release_after_commit = true\n").unwrap();
    let c = cfg.to_str().unwrap();
    let demo = |entries: &str| {
        let o = small_demo(dir, c, entries);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    };
    demo("400");
    let (store, backup) = (dir.join("store"), dir.join("backup"));
    copy_tree(&store, &backup);
    demo("400");
    between();
    std::fs::remove_dir_all(&store).unwrap();
    copy_tree(&backup, &store);
    (c.to_string(), store)
}
