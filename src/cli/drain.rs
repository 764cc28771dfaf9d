//! `tierindex drain`: the standalone recovery tool.
//!
//! Opens the data directory exactly as the broker would (recovery, leftover
//! seals, journal replay), seals whatever active segment is left, uploads and
//! verifies everything pending within the deadline, and exits with a code
//! that says what is left.

use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::cli::{Cli, emit, note};
use crate::error::Result;
use crate::lifecycle::{
    EXIT_DRAINED, EXIT_ERROR, EXIT_FENCED, EXIT_NEEDS_OPERATOR, EXIT_PENDING, ShutdownSignals,
};
use crate::metrics::Metrics;
use crate::tier::{ShutdownReport, StoreDamage, TierIndex};

/// Longest `--deadline` accepted.
const DEADLINE_MAX: Duration = Duration::from_secs(24 * 3600);

/// `--deadline`: a `humantime` duration above zero and at most 24 h.
pub(crate) fn parse_deadline(s: &str) -> std::result::Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 5m)"))?;
    if d.is_zero() {
        return Err(
            "must be above zero: nothing could be drained (examples: 500ms, 30s, 5m)".into(),
        );
    }
    if d > DEADLINE_MAX {
        return Err("must be at most 24h".into());
    }
    Ok(d)
}

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// Give up (recording what is left) after this long, e.g. 30s, 5m
    /// (above zero, at most 24h).
    #[arg(long, default_value = "5m", value_parser = parse_deadline)]
    pub deadline: Duration,
    /// Append the entries of local sealed files the journal can never
    /// record (NOT JOURNALED) again to the active segment, then drain; each
    /// file goes to quarantine/. Only once `tierindex inspect` shows they
    /// belong to this stream (a second writer's, a lost journal record).
    #[arg(long)]
    pub adopt_unjournaled: bool,
}

pub async fn run(cli: &Cli, a: &DrainArgs) -> Result<i32> {
    let started = Instant::now();
    let mut cfg = cli.config()?;
    // No new active file: a drain appends nothing (an adopt's copy creates
    // one), and on a disk filled by sealed segments waiting for their
    // upload, creating it failed the drain that would free the space
    // (helper-74 F4).
    cfg.active_at_open = false;
    // A second signal exits at once; the journal makes that safe.
    let _signals = ShutdownSignals::install()?;
    let (ti, open) = TierIndex::open(cfg).await?;
    if !cli.json {
        note(&format!(
            "tierindex drain: {} (previous shutdown {}; {} quarantined at open)",
            open.store,
            if open.previous_shutdown_clean {
                "clean"
            } else {
                "NOT clean"
            },
            open.segments.quarantined.len()
        ));
        for n in &open.notes {
            note(&format!("  note: {n}"));
        }
    }
    if a.adopt_unjournaled {
        // Asked of the store within a tenth of the deadline (at least 5 s).
        let limit = (a.deadline / 10).max(Duration::from_secs(5));
        match ti.adopt_unjournaled(limit).await {
            Ok(done) => {
                for d in &done {
                    note(&format!(
                        "tierindex drain: adopted segment {}: {} entries appended again; the \
                         file moved to {}",
                        d.segment,
                        d.entries,
                        d.moved_to.as_deref().unwrap_or("-")
                    ));
                }
                if done.is_empty() {
                    note("tierindex drain: no sealed file without a journal record to adopt");
                }
            }
            Err(e) => {
                // The error names what was adopted before it; the drain
                // goes on and reports the files left.
                note(&format!("tierindex drain: adopting failed: {e}"));
            }
        }
    }
    let pending = ti.status().pending_segments;
    let bar = progress(pending, cli.json);
    let m = ti.metrics();
    let ticker = {
        let bar = bar.clone();
        let m = m.clone();
        tokio::spawn(async move {
            loop {
                bar.set_position(m.segments_committed.get());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let data_dir = ti.data_dir().to_path_buf();
    let report = ti.shutdown(a.deadline).await;
    ticker.abort();
    bar.finish_and_clear();
    let run = RunTotals::from_metrics(&m, 0, 0, Duration::ZERO, started).with_unsealed(&data_dir);
    Ok(print_report(cli.json, &report, &run, None))
}

fn progress(len: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} uploading {pos}/{len} segments [{elapsed}]",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Totals of a whole `demo` or `drain` run (this process), from its
/// metrics: what was appended and acknowledged, and what reached the store.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct RunTotals {
    /// Entries appended by this run (`demo` only).
    pub entries_appended: u64,
    /// Entries a flush made durable: what this run acknowledged.
    pub entries_flushed: u64,
    /// Entries in segments uploaded and read back by this run.
    pub entries_uploaded: u64,
    pub segments_sealed: u64,
    /// Segments uploaded and read back.
    pub segments_uploaded: u64,
    /// Segments verified and committed (journal `Committed`).
    pub segments_committed: u64,
    pub bytes_uploaded: u64,
    pub elapsed_ms: u64,
    /// Time spent appending (`demo`: from the first append to the stop).
    pub append_ms: u64,
    /// Entries appended per second of appending.
    pub append_rate_per_s: f64,
    /// Bytes uploaded per second of the run.
    pub upload_bytes_per_s: f64,
    /// Entries left, after the shutdown, in active segment files: flushed
    /// ones are acknowledged, and the next start seals and uploads them
    /// (a shutdown that could not seal: a failed disk, a poisoned writer).
    pub unsealed_entries: u64,
    /// Sealed files, after the shutdown, that the journal does not record
    /// yet, above its highest id (a journal that failed): the next start
    /// journals and uploads them. (Those below are `NOT JOURNALED`.)
    pub unjournaled_sealed: u64,
    /// Losses recorded in `quarantine/*.why.json` after the shutdown, by
    /// this run or an earlier one, that an operator has not moved away:
    /// each keeps the exit at 4, as in `status` (one found by an earlier
    /// run made a later `drain` exit 0 while `status` said 4). In JSON as
    /// the report's `losses_recorded_earlier` (those this run did not
    /// find itself: this run's are its `lost`).
    #[serde(skip)]
    pub losses_recorded: Vec<String>,
    /// Set when, after the shutdown, the data directory or its journal is
    /// not there any more (deleted or moved under the running process):
    /// what is missing. In JSON as `local_state_gone`.
    #[serde(rename = "local_state_gone", skip_serializing_if = "Option::is_none")]
    pub gone: Option<LocalGone>,
    /// Local files (or `segments/`) that could not be read when counting
    /// the above, with why: the counts leave them out (helper-82 F4: after
    /// an I/O error a report said 0 unsealed entries while 29,600
    /// acknowledged ones sat in active files).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreadable_local: Vec<String>,
}

/// The data directory, or its journal, found missing when the report was
/// made (a `stat` then, not a guess from an error): pending segments'
/// records and files went with it (helper-81 F4: the report said they
/// "stay in the journal with their local files").
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct LocalGone {
    /// What is missing, for the text: "the data directory X" or "its
    /// journal X".
    pub what: String,
    /// The whole data directory is missing (else only its journal).
    pub dir: bool,
    /// Sealed segment files still in `segments/` (only the journal gone).
    pub sealed_left: Vec<u64>,
}

impl LocalGone {
    /// Looks now: `None` while the data directory and its journal file are
    /// there (or cannot be checked: only a missing one counts).
    pub(crate) fn check(data_dir: &std::path::Path) -> Option<LocalGone> {
        let missing = |p: &std::path::Path| matches!(std::fs::metadata(p), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
        if missing(data_dir) {
            return Some(LocalGone {
                what: format!("the data directory {}", data_dir.display()),
                dir: true,
                sealed_left: Vec::new(),
            });
        }
        let log = crate::journal::log_path(data_dir);
        if !missing(&log) {
            return None;
        }
        let mut sealed_left: Vec<u64> =
            std::fs::read_dir(data_dir.join(crate::datadir::SEGMENTS_DIR))
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    match crate::segment::names::classify(&e.file_name().to_string_lossy()) {
                        crate::segment::names::Kind::Sealed(id) => Some(id.0),
                        _ => None,
                    }
                })
                .collect();
        sealed_left.sort_unstable();
        Some(LocalGone {
            what: format!("its journal {}", log.display()),
            dir: false,
            sealed_left,
        })
    }
}

impl RunTotals {
    /// `appending`: how long the run appended (zero for `drain`).
    pub(crate) fn from_metrics(
        m: &Metrics,
        appended: u64,
        flushed: u64,
        appending: Duration,
        started: Instant,
    ) -> RunTotals {
        let elapsed = started.elapsed();
        let rate = |n: u64, d: Duration| {
            let secs = d.as_secs_f64();
            if secs > 0.0 {
                (n as f64 / secs).round()
            } else {
                0.0
            }
        };
        RunTotals {
            entries_appended: appended,
            entries_flushed: flushed,
            entries_uploaded: m.entries_uploaded.get(),
            segments_sealed: m.segments_sealed.get(),
            segments_uploaded: m.segments_uploaded.get(),
            segments_committed: m.segments_committed.get(),
            bytes_uploaded: m.upload_bytes.get(),
            elapsed_ms: elapsed.as_millis() as u64,
            append_ms: appending.as_millis() as u64,
            append_rate_per_s: rate(appended, appending),
            upload_bytes_per_s: rate(m.upload_bytes.get(), elapsed),
            unsealed_entries: 0,
            unjournaled_sealed: 0,
            losses_recorded: Vec::new(),
            gone: None,
            unreadable_local: Vec::new(),
        }
    }

    /// Counts what the data directory's active files still hold (read
    /// after the shutdown, without the lock: reading only).
    pub(crate) fn with_unsealed(mut self, data_dir: &std::path::Path) -> RunTotals {
        // The journal as it is on disk (read only): a sealed file it does
        // not record is pending too (helper-61: a report said `pending: 1`
        // with 958 such files): one above the journal's highest id (every
        // id it records is at or below it; files below it that it does not
        // record are the shutdown report's `unjournaled`). Only that id is
        // read: a replay would build the whole state again (a second
        // 500 MB at 1,000,000 segments). A journal that cannot be read
        // counts every file as known, as before.
        let max = crate::journal::Journal::max_segment_id_on_disk(data_dir);
        let known = |id: crate::segment::SegmentId| match &max {
            Ok(max) => max.is_some_and(|m| id <= m),
            Err(_) => true,
        };
        let local = crate::datadir::local_pending(data_dir, &known, None);
        self.unsealed_entries = local.unsealed_items;
        self.unjournaled_sealed = local.unjournaled_sealed.len() as u64;
        self.losses_recorded = crate::cli::local::recorded_losses(data_dir)
            .into_iter()
            .map(|n| n.line)
            .collect();
        self.gone = LocalGone::check(data_dir);
        // A directory that is gone is said by `gone`, not once more here.
        if self.gone.is_none() {
            self.unreadable_local = local.unreadable;
        }
        self
    }

    /// The recorded losses `r` does not report itself (found by an
    /// earlier run).
    pub(crate) fn earlier_losses<'a>(&'a self, r: &ShutdownReport) -> Vec<&'a str> {
        let this_run: Vec<String> = r.lost.iter().map(|n| n.line()).collect();
        self.losses_recorded
            .iter()
            .filter(|l| !this_run.contains(l))
            .map(String::as_str)
            .collect()
    }
}

/// A shutdown report with the run's totals (JSON: the report's fields,
/// then `run`, then `fatal`).
#[derive(Serialize)]
pub(crate) struct ReportOut<'a> {
    #[serde(flatten)]
    pub(crate) shutdown: &'a ShutdownReport,
    pub(crate) run: &'a RunTotals,
    /// The error that ended the run early (demo), if any.
    pub(crate) fatal: Option<&'a str>,
    /// Losses an earlier run found, still recorded in
    /// `quarantine/*.why.json` (exit 4 until an operator moves them away).
    pub(crate) losses_recorded_earlier: Vec<&'a str>,
}

fn mib_per_s(bytes_per_s: f64) -> String {
    format!("{:.1} MiB/s", bytes_per_s / (1024.0 * 1024.0))
}

/// Print a shutdown/drain report with the run's totals and return the exit
/// code it implies. `fatal`: the error that stopped a demo early (exit 1
/// unless fenced).
pub(crate) fn print_report(
    json: bool,
    r: &ShutdownReport,
    run: &RunTotals,
    fatal: Option<&str>,
) -> i32 {
    let out = ReportOut {
        shutdown: r,
        run,
        fatal,
        losses_recorded_earlier: run.earlier_losses(r),
    };
    emit(json, &out, report_text);
    report_code(r, run, fatal)
}

/// The text form of a report.
fn report_text(o: &ReportOut<'_>) -> String {
    let (r, t) = (o.shutdown, o.run);
    let mut s = format!(
        "sealed at shutdown: {}\nuploaded+verified: {} segments, {} bytes in {} ms (the shutdown drain)\npending: {}\nquarantined: {}\nclean marker: {}",
        r.sealed_at_shutdown,
        r.drain.segments_done,
        r.drain.bytes_done,
        r.elapsed_ms,
        r.drain.pending.len(),
        r.drain.quarantined.len(),
        r.clean_marker_written
    );
    for p in &r.drain.pending {
        s.push_str(&format!(
            "\n  pending {:020} {} {}",
            p.id,
            p.state,
            p.last_error.as_deref().unwrap_or("")
        ));
    }
    for p in &r.drain.quarantined {
        s.push_str(&format!(
            "\n  quarantined {:020}: {}",
            p.id,
            p.last_error.as_deref().unwrap_or("")
        ));
    }
    if !r.lost.is_empty() {
        // A file that could not be read item by item lost an unknown
        // number: "0 entries" would read as nothing lost.
        let unknown = r.lost.iter().filter(|n| n.unknown_loss.is_some()).count();
        s.push_str(&format!(
            "\nLOST to local damage: {} entries counted",
            r.lost_items()
        ));
        if unknown > 0 {
            s.push_str(&format!(
                ", and an unknown number in {unknown} file(s) (kept in quarantine/: the \
                 lines below and `tierindex quarantine list` say why and what to do)"
            ));
        }
        for n in &r.lost {
            s.push_str(&format!("\n  lost {}", n.line()));
        }
    }
    let (asking, accepted): (Vec<&StoreDamage>, Vec<&StoreDamage>) =
        r.damaged_in_store.iter().partition(|d| d.needs_operator());
    if !asking.is_empty() {
        let lost = asking.iter().filter(|d| d.lost).count();
        s.push_str(&format!(
            "\nDAMAGED IN THE STORE: the stream's manifest marks {} segment(s) damaged ({lost} \
             LOST: no intact copy was known when marked); readers skip them. `tierindex \
             reconcile --deep --repair` repairs those of which an intact local copy is held \
             and clears notes whose objects verify whole again; a loss no copy can repair is \
             accepted with `--accept-loss ID --reason TEXT` added to it",
            asking.len()
        ));
        for d in &asking {
            s.push_str(&format!(
                "\n  {} {:020}: {}",
                if d.lost { "LOST" } else { "damaged" },
                d.segment,
                d.reason
            ));
        }
    }
    if !accepted.is_empty() {
        s.push_str(&format!(
            "\nLOSS ACCEPTED in the store: {} segment(s) LOST, their loss accepted by an \
             operator (readers skip them; their entries are gone)",
            accepted.len()
        ));
        for d in &accepted {
            if let Some((at, why)) = &d.loss_accepted {
                s.push_str(&format!(
                    "\n  LOST {:020}: {}; {}",
                    d.segment,
                    d.reason,
                    crate::remote::manifest::acceptance_text(*at, why)
                ));
            }
        }
    }
    let earlier = &o.losses_recorded_earlier;
    if !earlier.is_empty() {
        s.push_str(&format!(
            "\nLOST to local damage, found by an earlier run: {} file(s) (recorded in \
             quarantine/*.why.json; `tierindex quarantine list` shows them; move a record out \
             of quarantine/ once its loss is dealt with)",
            earlier.len()
        ));
        for l in earlier.iter() {
            s.push_str(&format!("\n  lost {l}"));
        }
    }
    if !r.unlisted.is_empty() {
        s.push_str(&format!(
            "\nNOT IN THE MANIFEST: {} segment(s) the journal records as committed are not \
             listed in the stream's manifest (rolled back or restored in the store, or another \
             store), or listed with another data directory's segment under their id: readers \
             through it miss them. `tierindex reconcile --repair` commits those whose objects \
             are in place and whose id is free, and lists those whose object and local copy \
             are both gone (released after commit) marked LOST, naming their entries and how \
             to accept the loss; this data directory's next drain reseals the others under \
             new ids from their local copies: {:?}",
            r.unlisted.len(),
            r.unlisted
        ));
    }
    if !r.unjournaled.is_empty() {
        s.push_str(&format!(
            "\nNOT JOURNALED: {} local sealed file(s) have no journal record and are below the \
             journal's highest id, so nothing uploads their entries (a second process sealed \
             them beside this one, a build before session 31 sealed later segments after one \
             failed to seal, or the journal lost their records): {:?}. Keep the files; \
             `tierindex inspect` shows their entries, and once they belong to this stream \
             `tierindex drain --adopt-unjournaled` appends them again and uploads them",
            r.unjournaled.len(),
            r.unjournaled
        ));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!("\nerror: {e}"));
    }
    s.push_str(&format!(
        "\nrun totals ({:.1} s):",
        t.elapsed_ms as f64 / 1000.0
    ));
    if t.entries_appended > 0 || o.fatal.is_some() {
        s.push_str(&format!(
            "\n  entries: {} appended, {} flushed (acknowledged), {:.0} entries/s over {} ms of appending",
            t.entries_appended, t.entries_flushed, t.append_rate_per_s, t.append_ms
        ));
    }
    s.push_str(&format!(
        "\n  segments: {} sealed, {} uploaded, {} verified and committed\n  uploaded: {} bytes, {} entries, {}",
        t.segments_sealed,
        t.segments_uploaded,
        t.segments_committed,
        t.bytes_uploaded,
        t.entries_uploaded,
        mib_per_s(t.upload_bytes_per_s)
    ));
    if t.unsealed_entries > 0 {
        s.push_str(&format!(
            "\n  {} entries remain unsealed in active segment files (the flushed ones are \
             acknowledged and durable): the next start or `tierindex drain` seals and uploads them",
            t.unsealed_entries
        ));
    }
    if t.unjournaled_sealed > 0 {
        s.push_str(&format!(
            "\n  {} sealed segment file(s) are not in the journal yet (it could not record \
             them): the next start or `tierindex drain` journals and uploads them",
            t.unjournaled_sealed
        ));
    }
    for u in &t.unreadable_local {
        s.push_str(&format!(
            "\n  CANNOT READ {u}: the counts above leave out what it holds (acknowledged \
             entries among them); `tierindex status` and `tierindex fsck` say more once it \
             can be read"
        ));
    }
    if r.fully_drained()
        && o.fatal.is_none()
        && t.unsealed_entries == 0
        && t.unjournaled_sealed == 0
        && t.unreadable_local.is_empty()
    {
        s.push_str("\n  everything sealed is uploaded and verified; nothing pending");
    } else if let (Some(g), false) = (&t.gone, r.drain.pending.is_empty()) {
        s.push_str(&gone_text(g, r));
    } else if !r.drain.pending.is_empty() {
        s.push_str(&format!(
            "\n  {} segment(s) still pending: they stay in the journal with their local files and upload at the next start or `tierindex drain`",
            r.drain.pending.len()
        ));
    }
    if let Some(f) = o.fatal {
        s.push_str(&format!("\nFATAL: the run stopped early: {f}"));
    }
    s
}

/// The pending segments of a report made when the data directory, or its
/// journal, was found missing: what went with it, by id, and no advice
/// to restart, drain or fsck what is not there.
fn gone_text(g: &LocalGone, r: &ShutdownReport) -> String {
    let ids: Vec<u64> = r.drain.pending.iter().map(|p| p.id).collect();
    let (lost, kept): (Vec<u64>, Vec<u64>) = ids.iter().partition(|id| !g.sealed_left.contains(id));
    let mut s = String::new();
    if !lost.is_empty() {
        s.push_str(&format!(
            "\n  LOST: {} pending segment(s) had not reached the store, and {} is not there any \
             more (deleted or moved while this process ran): {} gone with it, so nothing will \
             upload them: {:?}. The entries they held are lost, acknowledged ones among them if \
             a flush or seal made them durable; how many is not known to this report (the \
             journal recorded their counts). A restart at this path, \
             `tierindex drain` or `tierindex fsck` cannot bring them back; only a copy of the \
             data directory made before (or the directory itself, if it was moved) can: \
             `tierindex drain --data-dir` on that copy uploads what it holds",
            lost.len(),
            g.what,
            if g.dir {
                "their journal records and local files are"
            } else {
                "their journal records are, and their local files are too,"
            },
            lost
        ));
    }
    if !kept.is_empty() {
        s.push_str(&format!(
            "\n  {} pending segment(s) lost their journal records ({} is not there any more) but \
             their local files are still in segments/: {:?}. Keep the files; `tierindex \
             inspect` shows their entries",
            kept.len(),
            g.what,
            kept
        ));
    }
    s
}

/// The `FENCED:` line. Uncommitted segments stay in whatever state they
/// reached (a fence found them `Sealed` as often as `Verified`), and a
/// newer epoch under this broker's own owner id is not "another owner"
/// (helper-81 F3: two brokers sharing an id fenced each other in turn).
fn fenced_line(why: &str, r: &ShutdownReport) -> String {
    let who = if why.contains(crate::remote::manifest::SAME_OWNER_ID_FENCE) {
        "a newer epoch of the stream's manifest is held under this broker's own owner_id"
    } else {
        "this process lost the stream's manifest to a newer owner epoch, or could not take it"
    };
    let mut states: std::collections::BTreeMap<&str, usize> = Default::default();
    for p in &r.drain.pending {
        *states.entry(p.state.as_str()).or_default() += 1;
    }
    let states = if states.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = states.iter().map(|(s, n)| format!("{n} {s}")).collect();
        format!(" ({})", list.join(", "))
    };
    format!(
        "tierindex: FENCED: {who} ({why}); uploads stopped, uncommitted segments stay in the \
         journal with their local files{states}"
    )
}

/// A report's exit code; a fence is also said on stderr.
pub(crate) fn report_code(r: &ShutdownReport, run: &RunTotals, fatal: Option<&str>) -> i32 {
    if let Some(why) = &r.fenced {
        note(&fenced_line(why, r));
        EXIT_FENCED
    } else if !r.drain.quarantined.is_empty()
        || !r.lost.is_empty()
        || !r.unlisted.is_empty()
        || !r.unjournaled.is_empty()
        || !r.drain.parked.is_empty()
    {
        EXIT_NEEDS_OPERATOR
    } else if fatal.is_some() {
        EXIT_ERROR
    } else if !run.earlier_losses(r).is_empty()
        || r.damaged_in_store.iter().any(StoreDamage::needs_operator)
        || !run.unreadable_local.is_empty()
        // Pending segments whose journal (or whole data directory) went:
        // lost, not pending (helper-85 F2: "LOST: ..." with exit 3, which
        // says the next start resumes them).
        || (run.gone.is_some() && !r.drain.pending.is_empty())
    {
        // Standing conditions an earlier run or a reader recorded (they
        // stay until an operator acts): below a fatal error of this run,
        // above pending, as in `status`.
        EXIT_NEEDS_OPERATOR
    } else if r.fully_drained()
        && run.unsealed_entries == 0
        && run.unjournaled_sealed == 0
        && run.unreadable_local.is_empty()
    {
        EXIT_DRAINED
    } else {
        EXIT_PENDING
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::DrainReport;

    fn text_of(r: &ShutdownReport, run: &RunTotals) -> String {
        report_text(&ReportOut {
            shutdown: r,
            run,
            fatal: None,
            losses_recorded_earlier: run.earlier_losses(r),
        })
    }

    fn report(fenced: Option<&str>) -> ShutdownReport {
        ShutdownReport {
            sealed_at_shutdown: 0,
            drain: DrainReport::default(),
            clean_marker_written: fenced.is_none(),
            error: fenced.map(|f| format!("fenced: {f}")),
            fenced: fenced.map(str::to_string),
            elapsed_ms: 0,
            lost: Vec::new(),
            unlisted: Vec::new(),
            unjournaled: Vec::new(),
            damaged_in_store: Vec::new(),
        }
    }

    /// helper-82 F4: a local file that could not be read after the
    /// shutdown is named, and the run is not "nothing pending", exit 0.
    #[test]
    fn an_unreadable_local_file_is_named_not_counted_as_nothing() {
        let run = RunTotals {
            unreadable_local: vec!["/d/segments/00000000000000000001.active: EIO".into()],
            ..RunTotals::default()
        };
        let r = report(None);
        let t = text_of(&r, &run);
        assert!(
            t.contains("CANNOT READ /d/segments/00000000000000000001.active"),
            "{t}"
        );
        assert!(!t.contains("nothing pending"), "{t}");
        assert_eq!(report_code(&r, &run, None), EXIT_NEEDS_OPERATOR);
        assert_eq!(report_code(&r, &run, Some("EIO")), EXIT_ERROR);
    }

    /// A loss an earlier run recorded, or a damage note in the manifest,
    /// needs an operator (4), but does not hide this run's fatal error (1);
    /// and it is 4 over pending (3), as in `status`.
    #[test]
    fn standing_conditions_rank_below_a_fatal_error() {
        let run = RunTotals {
            losses_recorded: vec!["segment 5: 1 LOST".into()],
            ..RunTotals::default()
        };
        let r = report(None);
        assert_eq!(report_code(&r, &run, None), EXIT_NEEDS_OPERATOR);
        assert_eq!(report_code(&r, &run, Some("ENOSPC")), EXIT_ERROR);
        let pending = RunTotals {
            unsealed_entries: 1,
            ..run.clone()
        };
        assert_eq!(report_code(&r, &pending, None), EXIT_NEEDS_OPERATOR);
        let mut noted = report(None);
        noted.damaged_in_store.push(crate::tier::StoreDamage {
            segment: 3,
            lost: true,
            reason: "no object under the key".into(),
            loss_accepted: None,
        });
        let clean = RunTotals::default();
        assert_eq!(report_code(&noted, &clean, None), EXIT_NEEDS_OPERATOR);
        // The same loss, accepted by an operator: reported, not asked again.
        let mut accepted = noted.clone();
        accepted.damaged_in_store[0].loss_accepted = Some((1, "gone with the old bucket".into()));
        assert_eq!(report_code(&accepted, &clean, None), EXIT_DRAINED);
        assert!(
            text_of(&accepted, &clean).contains("LOSS ACCEPTED"),
            "{}",
            text_of(&accepted, &clean)
        );
        assert_eq!(report_code(&noted, &clean, Some("ENOSPC")), EXIT_ERROR);
        // This run's own loss is reported by the report itself, not twice.
        let mut own = report(None);
        own.lost.push(crate::datadir::LossNote {
            segment: 5,
            file: "segments/5.seg".into(),
            kind: "sealed".into(),
            salvaged_items: 4,
            lost_items: 1,
            lost: Vec::new(),
            unknown_loss: None,
            header_rebuilt: false,
            tail_removed: None,
            sealed_as: None,
            original_moved_to: None,
        });
        let line = own.lost[0].line();
        let run = RunTotals {
            losses_recorded: vec![line],
            ..RunTotals::default()
        };
        assert!(run.earlier_losses(&own).is_empty());
    }

    #[test]
    fn a_fence_exits_with_its_own_code() {
        let run = RunTotals::default();
        assert_eq!(print_report(true, &report(None), &run, None), EXIT_DRAINED);
        assert_eq!(
            print_report(true, &report(Some("epoch 2 (owner \"b\")")), &run, None),
            EXIT_FENCED
        );
        assert_eq!(
            print_report(true, &report(None), &run, Some("No space left on device")),
            EXIT_ERROR
        );
        // Entries left in an active file are pending, never "drained".
        let left = RunTotals {
            unsealed_entries: 3,
            ..RunTotals::default()
        };
        assert_eq!(print_report(true, &report(None), &left, None), EXIT_PENDING);
        // So are sealed files the journal does not record yet.
        let left = RunTotals {
            unjournaled_sealed: 2,
            ..RunTotals::default()
        };
        assert_eq!(print_report(true, &report(None), &left, None), EXIT_PENDING);
    }

    /// A data directory whose journal is gone: the pending segments whose
    /// files are gone too are reported lost, those whose files remain are
    /// named as kept; neither is promised an upload (helper-81 F4).
    #[test]
    fn pending_segments_of_a_gone_journal_are_not_promised_an_upload() {
        let d = tempfile::tempdir().unwrap();
        let seg = d.path().join(crate::datadir::SEGMENTS_DIR);
        std::fs::create_dir_all(&seg).unwrap();
        std::fs::write(
            seg.join(crate::segment::sealed::sealed_file_name(crate::SegmentId(
                2,
            ))),
            b"x",
        )
        .unwrap();
        let g = LocalGone::check(d.path()).expect("no journal");
        assert!(!g.dir && g.sealed_left == vec![2], "{g:?}");
        let mut r = report(None);
        for id in [1, 2] {
            r.drain.pending.push(crate::pipeline::PendingNote {
                id,
                state: "Sealed".into(),
                last_error: None,
            });
        }
        let run = RunTotals {
            gone: Some(g),
            ..RunTotals::default()
        };
        let t = text_of(&r, &run);
        assert!(
            t.contains("LOST: 1 pending segment(s)") && t.contains(": [1]."),
            "{t}"
        );
        assert!(t.contains("still in segments/: [2]"), "{t}");
        assert!(!t.contains("upload at the next start"), "{t}");
        // Lost, not pending (helper-85 F2: exit 3).
        assert_eq!(report_code(&r, &run, None), EXIT_NEEDS_OPERATOR);
        let gone = LocalGone::check(&d.path().join("nothing")).expect("no directory");
        assert!(gone.dir, "{gone:?}");
    }

    /// A fence by an epoch held under this broker's own owner id says so
    /// and advises against a plain restart; no fence claims the segments
    /// are `Verified` (helper-81 F3).
    #[test]
    fn a_fence_under_our_own_owner_id_says_so() {
        let same = format!(
            "stream \"s\": epoch 2 (owner \"broker-1\" with a lease until x) replaced our epoch \
             1 (owner \"broker-1\") at manifest version 7; stop publishing; {}",
            crate::remote::manifest::same_owner_id_advice("broker-1")
        );
        let mut r = report(Some(&same));
        r.drain.pending.push(crate::pipeline::PendingNote {
            id: 6,
            state: "Sealed".into(),
            last_error: None,
        });
        let line = fenced_line(&same, &r);
        for want in [
            "this broker's own owner_id",
            "another broker runs with the same owner_id \"broker-1\"",
            "give each broker its own owner_id",
            "do not simply restart",
            "stay in the journal with their local files (1 Sealed)",
        ] {
            assert!(line.contains(want), "{want:?}: {line}");
        }
        assert!(!line.contains("Verified"), "{line}");
        let other = "stream \"s\": epoch 2 (owner \"b\") replaced our epoch 1 (owner \"a\")";
        let line = fenced_line(other, &report(Some(other)));
        assert!(!line.contains("own owner_id"), "{line}");
        assert!(!line.contains("Verified"), "{line}");
    }

    #[test]
    fn deadlines_are_bounded() {
        assert!(parse_deadline("0s").is_err());
        assert!(parse_deadline("0").is_err());
        assert!(parse_deadline("25h").is_err());
        assert!(parse_deadline("soon").is_err());
        assert_eq!(parse_deadline("500ms"), Ok(Duration::from_millis(500)));
    }
}
