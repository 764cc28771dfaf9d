//! Issue 11, "the journal never forgets silently": one bit flipped in the
//! middle of the journal of a data directory that ran with
//! `release_after_commit = true` (the store holds the only copy of the
//! released segments).
//!
//! Before: replay cut every frame after the flip as a "torn tail", and the
//! reconciler then deleted the forgotten segments' objects as orphans
//! (acknowledged entries gone, exit 0). Now: the open refuses with a message
//! that names `fsck --repair`, nothing is cut and nothing is deleted;
//! `fsck --repair` rebuilds the journal, the broker starts again, and every
//! acknowledged entry is still in a checked segment in the store or on disk.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tierindex::journal::{Frame, decode_file, log_path};
use tierindex::lifecycle::{EXIT_ERROR, EXIT_NEEDS_OPERATOR};
use tierindex::recovery::reconcile::{ReconcileOptions, reconcile};
use tierindex::segment::sealed::SealedSegment;
use tierindex::{Config, TierIndex};

const ITEMS: u32 = 40;
const ENTRIES: u64 = ITEMS as u64 * 6 + 7;

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
        ..Config::default()
    }
}

fn cli(data: &Path, store: &Path, args: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_tierindex"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TIERINDEX_LOG", "warn")
        .arg("--data-dir")
        .arg(data)
        .arg("--store")
        .arg(format!("file://{}", store.display()))
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

/// Every file under `dir` with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    common::files_under(dir)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(dir.join(&p)).unwrap();
            (p, b)
        })
        .collect()
}

/// The offsets held by every sealed segment under `dir` that passes the
/// full check.
fn offsets_in(dir: &Path) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for p in common::files_under(dir) {
        if p.extension().is_some_and(|e| e == "seg") {
            let seg = SealedSegment::open(&dir.join(&p)).expect("a checked segment");
            out.extend(seg.entries().iter().map(|e| e.offset));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bit_flip_in_the_middle_of_the_journal_loses_and_deletes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, store) = (tmp.path().join("data"), tmp.path().join("store"));
    let cfg = config(&data, &store);
    let (ti, _) = TierIndex::open(cfg.clone()).await.unwrap();
    for o in 0..ENTRIES {
        ti.append(
            format!("k{}", o % 13).as_bytes(),
            o,
            10,
            1_700_000_000_000 + o,
        )
        .unwrap();
    }
    ti.flush().unwrap();
    assert!(ti.shutdown(Duration::from_secs(30)).await.fully_drained());
    let stored = files(&store);
    let all: BTreeSet<u64> = (0..ENTRIES).collect();
    assert_eq!(
        offsets_in(&store),
        all,
        "drained: the store holds every entry"
    );
    assert!(
        common::local_sealed_ids(&data).is_empty(),
        "released: the store holds the only copy"
    );

    // One bit in the payload of the middle frame.
    let log = log_path(&data);
    let mut bytes = std::fs::read(&log).unwrap();
    let d = decode_file(&bytes).unwrap();
    let batches: Vec<_> = d
        .frames
        .iter()
        .filter(|f| matches!(f.frame, Frame::Batch(_)))
        .collect();
    assert!(batches.len() > 10, "{}", batches.len());
    let mid = batches[batches.len() / 2];
    bytes[(mid.offset + 8 + mid.len / 2) as usize] ^= 0x02;
    std::fs::write(&log, &bytes).unwrap();

    // The library refuses, and says what to do.
    let e = TierIndex::open(cfg.clone()).await.err().expect("refused");
    let msg = e.to_string();
    assert!(
        msg.contains("not a torn tail") && msg.contains("fsck --repair"),
        "{msg}"
    );
    // The CLI: the broker path and the reconciler both refuse; exit 1.
    let (code, out) = cli(&data, &store, &["drain"]);
    assert_eq!(code, EXIT_ERROR, "{out}");
    assert!(out.contains("fsck --repair"), "{out}");
    let (code, out) = cli(&data, &store, &["reconcile", "--repair", "--grace-ms", "0"]);
    assert_eq!(code, EXIT_ERROR, "{out}");
    assert!(out.contains("fsck --repair"), "{out}");
    assert_eq!(std::fs::read(&log).unwrap(), bytes, "nothing cut");
    assert_eq!(files(&store), stored, "nothing in the store changed");

    // fsck --repair rebuilds the journal and keeps the damaged one. It
    // found damage and repaired it: exit 4, as for a repaired segment
    // (docs/cli.md; it exited 0 before).
    let (code, out) = cli(&data, &store, &["fsck", "--repair"]);
    assert_eq!(code, EXIT_NEEDS_OPERATOR, "{out}");
    assert!(out.contains("journal rebuilt"), "{out}");
    let kept: Vec<_> = std::fs::read_dir(data.join("journal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("journal.log.damaged."))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        std::fs::read(data.join("journal").join(&kept[0])).unwrap(),
        bytes
    );

    // The broker starts again and drains; the reconciler deletes nothing.
    let (ti, _) = TierIndex::open(cfg.clone()).await.unwrap();
    assert!(ti.shutdown(Duration::from_secs(30)).await.fully_drained());
    let s = tierindex::tier::open_store(&cfg).unwrap();
    let opts = ReconcileOptions {
        repair: true,
        grace: Duration::ZERO,
        deep: true,
        ..Default::default()
    };
    let r = reconcile(&cfg, &s, &opts).await.unwrap();
    assert_eq!(r.deleted, 0, "{:#?}", r.findings);
    let now = files(&store);
    for (k, b) in &stored {
        // Lease renewals are not data: a takeover deletes the older
        // epochs' (docs/format/remote-layout.md).
        if k.to_string_lossy().contains("/manifest/leases/") {
            continue;
        }
        assert_eq!(now.get(k), Some(b), "{} changed or went", k.display());
    }
    // Every acknowledged entry is still in a checked segment.
    let mut held = offsets_in(&store);
    held.extend(offsets_in(&data.join("segments")));
    assert_eq!(held, all);
}

/// Gap 12: `fsck --repair` on a data directory whose journal is damaged
/// and whose local copy of a committed segment (kept: no release) has a
/// flipped bit. The committed set comes from the journal's intact frames,
/// so the copy is quarantined as it is: no loss is reported (the store
/// holds every entry) and no entry is salvaged into a new segment to be
/// committed a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_with_a_damaged_journal_still_knows_committed_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, store) = (tmp.path().join("data"), tmp.path().join("store"));
    let cfg = Config {
        release_after_commit: false,
        ..config(&data, &store)
    };
    let (ti, _) = TierIndex::open(cfg.clone()).await.unwrap();
    for o in 0..ENTRIES {
        ti.append(
            format!("k{}", o % 13).as_bytes(),
            o,
            10,
            1_700_000_000_000 + o,
        )
        .unwrap();
    }
    ti.flush().unwrap();
    assert!(ti.shutdown(Duration::from_secs(30)).await.fully_drained());
    let ids = common::local_sealed_ids(&data);
    assert!(ids.len() > 3, "{ids:?}");
    // The newest segment's local copy: one bit in its first item (its
    // records are in the journal's last frames).
    let victim = *ids.last().unwrap();
    let seg_path = data
        .join("segments")
        .join(tierindex::segment::sealed::sealed_file_name(victim));
    let mut seg = std::fs::read(&seg_path).unwrap();
    let f = tierindex::segment::format::Footer::decode(
        &seg[seg.len() - tierindex::segment::format::FOOTER_LEN..],
    )
    .unwrap();
    seg[f.items_offset as usize + 3] ^= 0x10;
    std::fs::write(&seg_path, &seg).unwrap();
    // The journal: one bit in the first batch frame.
    let log = log_path(&data);
    let mut bytes = std::fs::read(&log).unwrap();
    let d = decode_file(&bytes).unwrap();
    let first = d
        .frames
        .iter()
        .find(|f| matches!(f.frame, Frame::Batch(_)))
        .expect("a batch frame");
    bytes[(first.offset + 8 + first.len / 2) as usize] ^= 0x02;
    std::fs::write(&log, &bytes).unwrap();

    let (code, out) = cli(&data, &store, &["fsck", "--repair"]);
    assert_eq!(code, EXIT_NEEDS_OPERATOR, "{out}");
    assert!(out.contains("journal rebuilt"), "{out}");
    assert!(
        !out.contains("LOST"),
        "a committed segment's damaged copy was salvaged and reported lost: {out}"
    );
    let quarantined: Vec<String> = std::fs::read_dir(data.join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        quarantined
            .iter()
            .any(|n| n.starts_with(&tierindex::segment::sealed::sealed_file_name(victim))),
        "{quarantined:?}"
    );
    // The store still holds every entry exactly once, and nothing local
    // holds the victim's entries again.
    let mut held = offsets_in(&store);
    assert_eq!(held, (0..ENTRIES).collect::<BTreeSet<u64>>());
    held.clear();
    for p in common::files_under(&data.join("segments")) {
        if p.extension().is_some_and(|e| e == "active") {
            let (_, es) =
                tierindex::segment::active::read_entries(&data.join("segments").join(&p)).unwrap();
            held.extend(es.iter().map(|e| e.offset));
        }
    }
    assert!(
        held.is_empty(),
        "entries salvaged into an active segment: {held:?}"
    );
}
