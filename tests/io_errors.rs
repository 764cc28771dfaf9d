//! I/O errors (issue 5): EIO on msync / fsync / write / rename and ENOSPC
//! on preallocation, injected through the named failpoints into the real
//! binary. Each must poison (or fail) cleanly: the process exits with an
//! error code (no SIGBUS, no panic), says what failed, acknowledges nothing
//! after the failure, and a restart (`drain`) recovers everything that was
//! acknowledged (the `tests/crash_model` invariants).

#![cfg(feature = "failpoints")]

mod crash_model;

use crash_model::{Model, Rig};

/// `(armed point, exit codes allowed, text stderr must contain, flush lines
/// expected exactly)`.
const CASES: &[(&str, &[i32], &str, Option<usize>)] = &[
    // The third flush fails: two were acknowledged, none after.
    ("active.msync=eio@3", &[1], "msync", Some(2)),
    (
        "active.create.fallocate=enospc@2+",
        &[1],
        "No space left on device",
        None,
    ),
    ("active.create.fsync=eio@2", &[1], "writer poisoned", None),
    ("active.create.dirsync=eio@2", &[1], "writer poisoned", None),
    ("seal.write=eio@1", &[1], "write sealed tmp", None),
    ("seal.fsync=eio@1", &[1], "writer poisoned", None),
    ("seal.rename=eio@1", &[1], "rename sealed tmp", None),
    ("seal.dirsync=eio@1", &[1], "writer poisoned", None),
    (
        "seal.remove_active=eio@1",
        &[1],
        "remove sealed source",
        None,
    ),
    (
        "seal.remove_active.dirsync=eio@1",
        &[1],
        "writer poisoned",
        None,
    ),
    // The journal poisons: uploads stop, and the writer stops acknowledging
    // appends at its next seal, which the journal cannot record (helper-61:
    // it went on acknowledging and sealing, exit 3).
    (
        "journal.append=eio@3",
        &[1],
        "the journal cannot record sealed segments",
        None,
    ),
    (
        "journal.fsync=eio@3",
        &[1],
        "journal fdatasync failed",
        None,
    ),
    (
        "journal.compact.fsync=eio@2",
        &[0, 3],
        "fsync compaction file",
        None,
    ),
    (
        "journal.compact.rename=eio@1",
        &[1, 3],
        "compaction rename",
        None,
    ),
    (
        "journal.compact.dirsync=eio@1",
        &[1, 3],
        "journal poisoned",
        None,
    ),
    // A read of a sealed file for its upload that fails for want of
    // descriptors says nothing of the file: retried, not quarantined
    // (helper-75 F2: such segments were journaled Quarantined, exit 4).
    ("upload.read=emfile@1", &[0], "Too many open files", None),
];

#[test]
fn injected_io_errors_poison_cleanly_and_a_restart_recovers() {
    let root = tempfile::Builder::new()
        .prefix("tierindex-io-errors-")
        .tempdir()
        .unwrap();
    let mut failures = Vec::new();
    for (i, (spec, codes, text, flushes)) in CASES.iter().enumerate() {
        let rig = Rig::new(root.path(), &format!("case-{i}"));
        let mut model = Model::default();
        let run = rig.demo(&[("TIERINDEX_FAILPOINTS", spec)]);
        let mut why = Vec::new();
        match run.code {
            Some(c) if codes.contains(&c) => {}
            Some(c) => why.push(format!("exit {c}, expected one of {codes:?}")),
            None => why.push("killed by a signal or hung".into()),
        }
        if !run.stderr.contains(text) {
            why.push(format!("stderr does not say {text:?}"));
        }
        if run.stderr.contains("panicked") {
            why.push("panicked".into());
        }
        let lines = run
            .stdout
            .lines()
            .filter(|l| l.starts_with("flushed "))
            .count();
        if let Some(n) = flushes
            && lines != *n
        {
            why.push(format!("{lines} flushes acknowledged, expected {n}"));
        }
        if let Err(e) = model
            .observe_demo(&run)
            .and_then(|()| rig.check(&mut model))
        {
            why.push(e);
        }
        let drain = rig.drain(&[]);
        if drain.code != Some(0) {
            why.push(format!(
                "restart drain exited {:?}: {}",
                drain.code,
                drain.tail()
            ));
        } else if let Err(e) = rig.check(&mut model).and_then(|()| rig.check_final(&model)) {
            why.push(format!("after the restart: {e}"));
        }
        let acked: u64 = model.acked.iter().map(|(s, e)| e - s).sum();
        eprintln!(
            "io-errors: {spec:<36} exit={:?} acknowledged={acked} recovered={}",
            run.code,
            if why.is_empty() { "ok" } else { "VIOLATION" }
        );
        if why.is_empty() {
            rig.remove();
        } else {
            failures.push(format!(
                "{spec}: {}\n  stderr: {}",
                why.join("; "),
                run.tail()
            ));
        }
    }
    crash_model::remove_bin_copy();
    if !failures.is_empty() {
        let kept = root.keep();
        panic!(
            "{} case(s) failed (kept in {}):\n{}",
            failures.len(),
            kept.display(),
            failures.join("\n")
        );
    }
}

/// A disk filled by sealed segments waiting for their upload: the drain
/// that would upload (and release) them must not need room for a new
/// active file it never writes (helper-74 F4: it preallocated one and
/// exited 1 with ENOSPC, every time). The demo's run fills the disk (each
/// active file after the first fails to preallocate); the drain runs with
/// the disk still full (every preallocation fails) and must recover all.
#[test]
fn a_drain_on_a_full_disk_needs_no_new_active_file() {
    let root = tempfile::Builder::new()
        .prefix("tierindex-io-full-")
        .tempdir()
        .unwrap();
    let rig = Rig::new(root.path(), "full-disk");
    let mut model = Model::default();
    let run = rig.demo(&[("TIERINDEX_FAILPOINTS", "active.create.fallocate=enospc@2+")]);
    assert_eq!(run.code, Some(1), "{}", run.tail());
    model.observe_demo(&run).unwrap();
    rig.check(&mut model).unwrap();
    let drain = rig.drain(&[("TIERINDEX_FAILPOINTS", "active.create.fallocate=enospc@1+")]);
    assert_eq!(drain.code, Some(0), "{}", drain.tail());
    assert!(!drain.stderr.contains("panicked"), "{}", drain.tail());
    rig.check(&mut model).unwrap();
    rig.check_final(&model).unwrap();
    let acked: u64 = model.acked.iter().map(|(s, e)| e - s).sum();
    assert!(acked > 0, "the demo acknowledged nothing: {}", run.tail());
    eprintln!("io-errors full disk: {acked} acknowledged, drained on a full disk");
    rig.remove();
}
