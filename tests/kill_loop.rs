//! Random kill loop (issue 5): start the real `tierindex demo` on one data
//! directory and store, SIGKILL it after a random delay, restart, repeat;
//! finally drain and check. Delays cover start-up recovery, appends, seals,
//! uploads and verification; one run in four first gets SIGTERM and then a
//! SIGKILL in the middle of its shutdown drain. After every kill the
//! expected-state model of `tests/crash_model` is checked; at the end every
//! acknowledged entry must be in the store exactly once.
//!
//! * `TIERINDEX_KILLS=N`: kills (default 200; `scripts/crash-loop.sh N`).
//! * `TIERINDEX_KILL_SEED=S`: the seed (default random, printed).
//!
//! On a violation the data directory and store are kept and their path is
//! printed.
//!
//! Part of the crash campaign, so built with the `failpoints` feature like
//! `tests/crash_points.rs` (`scripts/test.sh` runs both with `--nocapture`,
//! printing the summary line); no point is armed here.

#![cfg(feature = "failpoints")]

mod crash_model;

use std::time::{Duration, Instant};

use crash_model::{Model, Rig, only_torn_tails};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: plain syscall on our own child's pid (it is not reaped yet,
    // so the pid cannot have been reused).
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

#[test]
fn random_sigkills_lose_nothing_acknowledged() {
    let kills = env_u64("TIERINDEX_KILLS").unwrap_or(200);
    let seed = env_u64("TIERINDEX_KILL_SEED").unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let root = tempfile::Builder::new()
        .prefix("tierindex-kill-loop-")
        .tempdir()
        .unwrap();
    let rig = Rig::new(root.path(), "rig");
    let mut model = Model::default();
    let started = Instant::now();
    let (mut recoveries, mut term_then_kill, mut exited_first) = (0u64, 0u64, 0u64);
    // Start-ups and drains that reported only a torn tail (exit 4).
    let mut torn_tails = 0u64;
    let mut violation: Option<String> = None;
    eprintln!(
        "kill-loop: seed={seed} kills={kills} dir={}",
        rig.dir.display()
    );

    for k in 0..kills {
        // Runs until a signal: no --entries.
        let mut args = Rig::demo_args();
        let at = args.iter().position(|a| *a == "--entries").unwrap();
        args.drain(at..at + 2);
        let c = rig.command_for(&args, &[]);
        let (mut child, out, err) = rig.spawn(c, "kill");
        if k > 0 {
            recoveries += 1;
        }
        // 0-600 ms: start-up recovery (first ms), appends, seals, uploads.
        let delay = Duration::from_millis(rng.u64(0..600));
        std::thread::sleep(delay);
        if rng.u8(0..4) == 0 {
            // SIGTERM starts the drain; SIGKILL lands inside it.
            term_then_kill += 1;
            signal(child.id(), libc::SIGTERM);
            std::thread::sleep(Duration::from_millis(rng.u64(0..40)));
        }
        signal(child.id(), libc::SIGKILL);
        let status = child.wait().unwrap();
        if status.code().is_some() {
            // It finished its drain before the SIGKILL: fine, and counted.
            exited_first += 1;
        }
        let run = crash_model::Run {
            code: status.code(),
            stdout: std::fs::read_to_string(&out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err).unwrap_or_default(),
        };
        // A demo that finished before the kill exits 0 or 3, or 4 when its
        // start-up found only a torn tail the previous kill left (the model
        // check below decides whether anything acknowledged is missing).
        if run.code == Some(4) && only_torn_tails(&run.stderr) {
            torn_tails += 1;
        } else if let Some(c) = run.code
            && c != 0
            && c != 3
        {
            violation = Some(format!(
                "kill {k}: demo exited {c} before the kill:\n{}",
                run.tail()
            ));
            break;
        }
        if let Err(e) = model
            .observe_demo(&run)
            .and_then(|()| rig.check(&mut model))
        {
            violation = Some(format!("kill {k} after {delay:?}: {e}\n{}", run.tail()));
            break;
        }
        if (k + 1) % 250 == 0 {
            eprintln!(
                "kill-loop: progress kills={} objects={} elapsed={:.1}s",
                k + 1,
                model.objects.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    if violation.is_none() {
        let mut run = rig.drain(&[]);
        if run.code == Some(4) && only_torn_tails(&run.stderr) {
            // The last kill tore the item being written: reported once;
            // the next drain must be clean.
            torn_tails += 1;
            if let Err(e) = rig.check(&mut model) {
                violation = Some(format!("after a torn tail was reported: {e}"));
            }
            run = rig.drain(&[]);
        }
        if violation.is_some() {
            // Reported above.
        } else if run.code != Some(0) {
            violation = Some(format!(
                "final drain exited {:?}:\n{}",
                run.code,
                run.tail()
            ));
        } else if let Err(e) = rig.check(&mut model).and_then(|()| rig.check_final(&model)) {
            violation = Some(format!("after the final drain: {e}"));
        }
    }
    let acked: u64 = model.acked.iter().map(|(s, e)| e - s).sum();
    eprintln!(
        "kill-loop: kills={kills} recoveries={recoveries} sigterm-then-sigkill={term_then_kill} \
         exited-before-kill={exited_first} torn-tails-reported={torn_tails} \
         acknowledged-entries={acked} objects={} \
         violations={} seed={seed} elapsed={:.1}s",
        model.objects.len(),
        u8::from(violation.is_some()),
        started.elapsed().as_secs_f64()
    );
    crash_model::remove_bin_copy();
    if let Some(v) = violation {
        let kept = root.keep();
        panic!("violation (directory kept: {}): {v}", kept.display());
    }
}
