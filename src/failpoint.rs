//! Named crash and I/O-error points at every persist step (feature `failpoints`).
//!
//! Each persist step in the writer, the sealer, the journal and the upload
//! pipeline calls [`hit`] with a name from [`POINTS`]. Without the
//! `failpoints` feature `hit` is an empty inline function: release builds
//! carry no test hooks. With the feature, the environment variable
//! `TIERINDEX_FAILPOINTS` arms points for the process:
//!
//! ```text
//! TIERINDEX_FAILPOINTS="seal.rename=crash@3;journal.fsync=eio@1"
//! ```
//!
//! * `crash@N`: on the N-th hit of the point (1-based), end the process at
//!   once with `_exit(CRASH_EXIT_CODE)`: no destructors, no buffered output,
//!   nothing flushed, exactly like `kill -9` at that instruction.
//! * `eio@N`, `enospc@N`: the N-th hit returns that OS error to the caller
//!   instead of doing the step (the error path a failing disk takes). Later
//!   hits pass, so a test sees what one failure leaves behind.
//! * `eio@N+`, `enospc@N+`: the N-th hit and every later one fail (a disk
//!   that stays full or broken).
//!
//! The crash harness (`tests/crash_points.rs`) runs the real binary once per
//! point and N; `docs/crash-safety.md` lists every point beside what a crash
//! there leaves and how recovery handles it.

/// Exit code of a process ended by an armed `crash@N` point.
#[cfg(any(test, feature = "testing", feature = "failpoints"))]
pub const CRASH_EXIT_CODE: i32 = 86;

/// Every named point, in the order data moves through them. A point
/// is hit immediately *before* the step its name describes unless the name
/// ends in `.after`.
pub const POINTS: &[&str] = &[
    // Active segment (src/segment/active.rs)
    "active.create.fallocate",
    "active.create.fsync",
    "active.create.dirsync",
    "active.append",
    "active.msync",
    "active.msync.after",
    "active.mark.write",
    "active.mark.fsync",
    "active.remove_empty",
    "active.remove_empty.dirsync",
    // Sealing (src/segment/sealed/write.rs, src/index/sealer.rs)
    "seal.write",
    "seal.fsync",
    "seal.rename",
    "seal.dirsync",
    "seal.remove_active",
    "seal.remove_active.dirsync",
    // Journal (src/journal/)
    "journal.append",
    "journal.fsync",
    "journal.compact.fsync",
    "journal.compact.rename",
    "journal.compact.dirsync",
    // Upload pipeline (src/upload/, src/pipeline/)
    "upload.read",
    "upload.put",
    "upload.multipart.create",
    "upload.multipart.part",
    "upload.multipart.complete",
    "upload.put.after",
    "verify",
    "verify.after",
    "commit",
    "release",
    "release.unlink",
    "release.dirsync",
    "release.after",
    // Manifest (src/remote/manifest.rs; reached only with `manifest = true`,
    // see MANIFEST_POINTS)
    "manifest.publish",
    "manifest.publish.after",
    "manifest.trim",
    "lease.renew",
];

/// The points only a `manifest = true` run reaches.
#[cfg(any(test, feature = "testing"))]
pub const MANIFEST_POINTS: &[&str] = &[
    "manifest.publish",
    "manifest.publish.after",
    "manifest.trim",
    "lease.renew",
];

/// Points the crash harness's demo workload does not reliably reach (an
/// empty active segment is removed only when ids are raised or at close; a
/// release may happen only in the shutdown drain). A crash there is the
/// crash at the neighbouring point (`release`, `release.after`,
/// `seal.remove_active*`); their error paths are exercised by
/// `tests/poison_paths.rs`. And `upload.read`, the read of a sealed file
/// before its upload: it writes nothing, so a crash there leaves what the
/// seal left; its errors are injected by `tests/io_errors.rs`.
#[cfg(any(test, feature = "testing"))]
pub const ERROR_ONLY_POINTS: &[&str] = &[
    "active.remove_empty",
    "active.remove_empty.dirsync",
    "release.unlink",
    "release.dirsync",
    "upload.read",
];

/// Points reached only through [`crash`]: nothing there returns an I/O
/// error to fail, so `eio@N` / `enospc@N` on them would arm nothing. The
/// parser refuses those actions on these points (a campaign that thinks it
/// injected errors must not pass silently).
#[cfg(any(test, feature = "testing", feature = "failpoints"))]
pub const CRASH_ONLY_POINTS: &[&str] = &[
    "active.append",
    "active.msync.after",
    "upload.put",
    "upload.multipart.create",
    "upload.multipart.part",
    "upload.multipart.complete",
    "upload.put.after",
    "verify",
    "verify.after",
    "commit",
    "release",
    "release.after",
    "manifest.publish",
    "manifest.publish.after",
    "manifest.trim",
    "lease.renew",
];

/// A point that can only crash (no I/O happens there to fail). Its name
/// must be in [`CRASH_ONLY_POINTS`].
#[inline(always)]
pub fn crash(_name: &'static str) {
    #[cfg(feature = "failpoints")]
    {
        debug_assert!(
            CRASH_ONLY_POINTS.contains(&_name),
            "{_name} is not in CRASH_ONLY_POINTS"
        );
        let _ = armed::point(_name);
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &'static str) -> std::io::Result<()> {
    Ok(())
}

#[cfg(feature = "failpoints")]
pub use armed::hit_counts;

/// Count a hit of the I/O point `name`; crash or fail if it is armed for
/// this hit. Never a name from [`CRASH_ONLY_POINTS`] (use [`crash`]).
#[cfg(feature = "failpoints")]
pub fn hit(name: &'static str) -> std::io::Result<()> {
    debug_assert!(
        !CRASH_ONLY_POINTS.contains(&name),
        "{name} is crash-only: call failpoint::crash"
    );
    armed::point(name)
}

/// Hits of every point so far (all zero without the feature).
#[cfg(not(feature = "failpoints"))]
pub fn hit_counts() -> Vec<(&'static str, u64)> {
    POINTS.iter().map(|p| (*p, 0)).collect()
}

/// With `TIERINDEX_FAILPOINTS_COUNTS` set, print `failpoint-hits NAME N` for
/// every point on stderr (the crash harness calibrates N from this).
pub fn report_counts() {
    if std::env::var_os("TIERINDEX_FAILPOINTS_COUNTS").is_some() {
        for (name, n) in hit_counts() {
            eprintln!("failpoint-hits {name} {n}");
        }
    }
}

#[cfg(feature = "failpoints")]
mod armed {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::{CRASH_EXIT_CODE, CRASH_ONLY_POINTS, POINTS};

    #[derive(Clone, Copy, Debug)]
    enum Action {
        Crash,
        Errno(i32),
    }

    static COUNTS: [AtomicU64; POINTS.len()] = [const { AtomicU64::new(0) }; POINTS.len()];

    pub fn hit_counts() -> Vec<(&'static str, u64)> {
        POINTS
            .iter()
            .zip(COUNTS.iter())
            .map(|(p, c)| (*p, c.load(Ordering::Relaxed)))
            .collect()
    }

    struct Armed {
        action: Action,
        at: u64,
        /// `@N+`: every hit from the N-th on.
        from_on: bool,
        hits: AtomicU64,
    }

    fn table() -> &'static HashMap<&'static str, Armed> {
        static TABLE: OnceLock<HashMap<&'static str, Armed>> = OnceLock::new();
        TABLE.get_or_init(|| {
            let spec = std::env::var("TIERINDEX_FAILPOINTS").unwrap_or_default();
            let mut t = HashMap::new();
            for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
                match parse(part) {
                    Ok((name, action, at, from_on)) => {
                        t.insert(
                            name,
                            Armed {
                                action,
                                at,
                                from_on,
                                hits: AtomicU64::new(0),
                            },
                        );
                    }
                    // A typo must not silently run an unarmed campaign.
                    Err(why) => {
                        eprintln!("TIERINDEX_FAILPOINTS: {why}");
                        std::process::exit(2);
                    }
                }
            }
            t
        })
    }

    fn parse(part: &str) -> Result<(&'static str, Action, u64, bool), String> {
        let (name, rest) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected NAME=ACTION@N"))?;
        let name = POINTS
            .iter()
            .copied()
            .find(|p| *p == name.trim())
            .ok_or_else(|| format!("unknown failpoint {name:?}"))?;
        let (action, at) = rest
            .split_once('@')
            .ok_or_else(|| format!("{part:?}: expected ACTION@N"))?;
        let (at, from_on) = match at.trim().strip_suffix('+') {
            Some(n) => (n, true),
            None => (at.trim(), false),
        };
        let at: u64 = at
            .parse()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| format!("{part:?}: N must be an integer >= 1"))?;
        let action = match action.trim() {
            "crash" => Action::Crash,
            "eio" => Action::Errno(libc::EIO),
            "enospc" => Action::Errno(libc::ENOSPC),
            "emfile" => Action::Errno(libc::EMFILE),
            other => return Err(format!("{part:?}: unknown action {other:?}")),
        };
        if matches!(action, Action::Errno(_)) && CRASH_ONLY_POINTS.contains(&name) {
            return Err(format!(
                "{part:?}: {name} can only crash (no I/O there returns an error); \
                 use crash@N, or an I/O point"
            ));
        }
        Ok((name, action, at, from_on))
    }

    /// Count a hit of `name`; crash or fail if it is armed for this hit.
    pub fn point(name: &'static str) -> std::io::Result<()> {
        match POINTS.iter().position(|p| *p == name) {
            Some(i) => {
                COUNTS[i].fetch_add(1, Ordering::Relaxed);
            }
            None => debug_assert!(false, "unlisted failpoint {name}"),
        }
        let Some(a) = table().get(name) else {
            return Ok(());
        };
        let n = a.hits.fetch_add(1, Ordering::SeqCst) + 1;
        if n < a.at || (n > a.at && !a.from_on) {
            return Ok(());
        }
        match a.action {
            Action::Crash => {
                // Say where, on stderr (unbuffered), then die like kill -9.
                let msg = format!("failpoint {name}: crash at hit {n}\n");
                unsafe {
                    libc::write(2, msg.as_ptr().cast(), msg.len());
                    libc::_exit(CRASH_EXIT_CODE);
                }
            }
            Action::Errno(e) => Err(std::io::Error::from_raw_os_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{CRASH_ONLY_POINTS, POINTS};
    use std::collections::BTreeSet;

    /// Point names passed to `call(` anywhere under `src/`.
    fn call_sites(call: &str) -> BTreeSet<String> {
        fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    out.push(std::fs::read_to_string(&p).unwrap());
                }
            }
        }
        let mut texts = Vec::new();
        walk(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut texts,
        );
        let pat = format!("{call}(\"");
        let mut names = BTreeSet::new();
        for t in &texts {
            for (i, _) in t.match_indices(&pat) {
                let rest = &t[i + pat.len()..];
                if let Some(end) = rest.find('"') {
                    names.insert(rest[..end].to_string());
                }
            }
        }
        names
    }

    /// The crash-only list is exactly the points reached through `crash`,
    /// and no point is reached both ways (the parser's refusal of `eio` on
    /// them would otherwise be wrong, or miss one).
    #[test]
    fn crash_only_points_are_the_crash_call_sites() {
        let crash = call_sites("failpoint::crash");
        let listed: BTreeSet<String> = CRASH_ONLY_POINTS.iter().map(|p| p.to_string()).collect();
        assert_eq!(crash, listed);
        let mut io = call_sites("failpoint::hit");
        io.extend(call_sites("fsync_dir_at"));
        io.extend(call_sites("durable::at"));
        // Names passed on as variables (`fsync_dir_at`'s own call) are not
        // literals; the debug assertions in `hit` and `crash` cover them.
        assert!(io.len() >= 15, "{io:?}");
        for p in &io {
            assert!(POINTS.contains(&p.as_str()), "{p} is not in POINTS");
        }
        assert!(
            io.is_disjoint(&listed),
            "{:?}",
            io.intersection(&listed).collect::<Vec<_>>()
        );
        for p in CRASH_ONLY_POINTS {
            assert!(POINTS.contains(p), "{p}");
        }
    }
}
