//! `tierindex demo`: a simulated broker on the embedded default store.
//!
//! Appends entries at a fixed rate, flushes every `--flush-every` entries
//! (printing `start <first-offset>` once and `flushed <count>` after each
//! flush when `--print-flushed`, so a test can check that everything
//! acknowledged survives a kill), and on Ctrl-C or
//! SIGTERM shuts down: seal, drain within the deadline, report.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::cli::drain::{ReportOut, RunTotals, parse_deadline, print_report, report_code};
use crate::cli::{Cli, emit, note, out_line};
use crate::config::{Config, SEGMENT_ITEMS_MAX, SLOT_COUNT_MAX};
use crate::error::{Error, Result};
use crate::lifecycle::{
    EXIT_DRAINED, EXIT_ERROR, EXIT_FENCED, EXIT_NEEDS_OPERATOR, EXIT_PENDING, ShutdownSignals,
};
use crate::segment::now_ms;
use crate::tier::{Host, TierIndex};

/// Highest `--rate` accepted (entries per second).
const RATE_MAX: u64 = 100_000_000;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Items per segment (small values roll and upload many segments).
    #[arg(long, default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(SEGMENT_ITEMS_MAX)))]
    pub segment_items: u32,
    /// Hash slots per segment.
    #[arg(long, default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(SLOT_COUNT_MAX)))]
    pub slots: u32,
    /// Entries appended per second (1 to 100000000).
    #[arg(long, default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..=RATE_MAX))]
    pub rate: u64,
    /// Stop by itself after this many entries (default: run until a signal).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub entries: Option<u64>,
    /// Distinct message keys.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub keys: u64,
    /// Flush (msync) after this many appends.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub flush_every: u64,
    /// Print `flushed N` after each flush (N = entries durable so far).
    #[arg(long)]
    pub print_flushed: bool,
    /// Drain deadline at shutdown (default: the config's shutdown_deadline_ms, 20 s).
    #[arg(long, value_parser = parse_deadline)]
    pub deadline: Option<Duration>,
    /// Serve Prometheus metrics on this address (host:port; GET /metrics).
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// Run this many streams in one process (1 to 10000), entries spread
    /// over them in turn; stream `i` is `<stream>-<i>` in `<data-dir>-<i>`,
    /// all on one store, drained together within one deadline, each
    /// reported, then the totals. The streams are one host's: its lock is
    /// the data directories' parent's (it writes `TIERINDEX_HOST` there),
    /// and each gets a `HOSTED` marker.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000),
          conflicts_with_all = ["print_flushed", "metrics_addr"])]
    pub streams: u32,
}

/// One stream of the run.
struct Stream {
    ti: TierIndex,
    /// The next offset to append; `None` once `u64::MAX` was used (a
    /// data directory whose highest offset is `u64::MAX` has none left:
    /// helper-82 F6, the start wrapped to 0).
    offset: Option<u64>,
    appended: u64,
    flushed: u64,
}

/// The data directory of stream `i` of a `--streams N` run: a sibling of
/// the configured one, `<data_dir>-<i>`.
fn stream_dir(base: &Path, i: u32) -> Result<PathBuf> {
    let name = base.file_name().ok_or_else(|| {
        Error::InvalidInput(format!(
            "--streams: data directory {} has no last component to number",
            base.display()
        ))
    })?;
    let mut n = name.to_os_string();
    n.push(format!("-{i}"));
    Ok(base.with_file_name(n))
}

/// Threads, open descriptors and resident memory of this process (Linux
/// `/proc`; `None`, printed `?`, where unavailable), for the multi-stream
/// report.
#[derive(Serialize)]
struct ProcessFigures {
    threads: Option<u64>,
    open_descriptors: Option<u64>,
    resident_kib: Option<u64>,
}

impl ProcessFigures {
    fn now() -> ProcessFigures {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        };
        ProcessFigures {
            threads: field("Threads:"),
            open_descriptors: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
            resident_kib: field("VmRSS:"),
        }
    }
}

impl std::fmt::Display for ProcessFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
        write!(
            f,
            "{} threads, {} open descriptors, {} resident",
            n(self.threads),
            n(self.open_descriptors),
            self.resident_kib
                .map_or_else(|| "?".to_string(), |v| format!("{v} kB"))
        )
    }
}

/// One stream of a `--streams N --json` report.
#[derive(Serialize)]
struct StreamOut<'a> {
    stream: &'a str,
    data_dir: &'a Path,
    exit: i32,
    #[serde(flatten)]
    report: ReportOut<'a>,
}

/// The whole `--streams N --json` report.
#[derive(Serialize)]
struct StreamsOut<'a> {
    streams: Vec<StreamOut<'a>>,
    totals: StreamsTotals,
    /// The stream whose failure stopped the run early, and the error.
    stopped_early: Option<StoppedEarly<'a>>,
    /// This process just before the drain.
    process_before_drain: &'a ProcessFigures,
}

#[derive(Serialize)]
struct StreamsTotals {
    streams: u32,
    entries_appended: u64,
    entries_flushed: u64,
    segments_pending: usize,
    /// Entries in files not sealed yet (active files the shutdown could not
    /// seal: a full disk), all streams together.
    entries_unsealed: u64,
    /// Sealed files no journal records, all streams together.
    sealed_not_journaled: u64,
    streams_fully_drained: usize,
    exit: i32,
}

#[derive(Serialize)]
struct StoppedEarly<'a> {
    stream: &'a str,
    error: &'a str,
}

/// The worst of the streams' exit codes (a fence first, then damage, then
/// an error, then pending work).
fn worst(codes: &[i32]) -> i32 {
    [EXIT_FENCED, EXIT_NEEDS_OPERATOR, EXIT_ERROR, EXIT_PENDING]
        .into_iter()
        .find(|c| codes.contains(c))
        .unwrap_or(EXIT_DRAINED)
}

pub async fn run(cli: &Cli, a: &DemoArgs) -> Result<i32> {
    let started = Instant::now();
    let mut cfg = cli.config()?;
    if cli.data_dir.is_none() && cli.config.is_none() {
        cfg.data_dir = PathBuf::from("tierindex-demo/data");
    }
    cfg.segment_items = a.segment_items;
    cfg.slot_count = a.slots;
    cfg.segment_max_age_ms = Some(10_000);
    if a.metrics_addr.is_some() {
        cfg.metrics_addr = a.metrics_addr.clone();
    }
    let n = a.streams;
    let deadline = a
        .deadline
        .unwrap_or(Duration::from_millis(cfg.shutdown_deadline_ms));
    let cfgs: Vec<Config> = if n == 1 {
        vec![cfg]
    } else {
        if cfg.metrics_addr.is_some() {
            return Err(Error::InvalidInput(
                "--metrics-addr (or metrics_addr) serves one stream's metrics: not with --streams above 1"
                    .into(),
            ));
        }
        // One store for every stream (the default store is the one next to
        // the configured data directory, which the numbered ones share).
        let store = cfg.store_url()?;
        let mode_given = cli.mode_given()?;
        // Every stream's name and directory name checked before any is
        // opened: a refusal at stream 10 of 12 left ten data directories
        // set up and ten manifests taken (helper-60).
        (0..n)
            .map(|i| {
                let data_dir = stream_dir(&cfg.data_dir, i)?;
                let stream = format!("{}-{i}", cfg.stream);
                crate::remote::keys::validate_stream(&stream)
                    .map_err(|e| Error::InvalidInput(format!("--streams {n}: stream {i}: {e}")))?;
                if data_dir.file_name().is_some_and(|f| f.len() > 255) {
                    return Err(Error::InvalidInput(format!(
                        "--streams {n}: the data directory of stream {i}, {}, has a name longer \
                         than 255 bytes",
                        data_dir.display()
                    )));
                }
                // Without --manifest, a stream's existing data directory
                // keeps its recorded mode, as a single stream's does (the
                // numbered directories were refused as a switch:
                // helper-57). A damaged identity is left to the open.
                let manifest = match crate::identity::Identity::load(&data_dir) {
                    Ok(Some(id)) if !mode_given => {
                        id.mode.map_or(cfg.manifest, |m| m.is_manifest())
                    }
                    _ => cfg.manifest,
                };
                Ok(Config {
                    data_dir,
                    stream,
                    store: Some(store.clone()),
                    manifest,
                    ..cfg.clone()
                })
            })
            .collect::<Result<_>>()?
    };
    let mut signals = ShutdownSignals::install()?;
    // Several streams are one host's: one lock for all (no descriptor a
    // stream), in the numbered directories' parent.
    let host = if n > 1 {
        let parent = match cfgs[0].data_dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        match Host::open(&parent) {
            Ok(h) => Some(h),
            Err(e) => {
                note(&format!(
                    "tierindex demo: cannot take the lock of {} for its {n} streams: {e}\n\
                     nothing was appended by this run",
                    parent.display()
                ));
                return Ok(EXIT_ERROR);
            }
        }
    } else {
        None
    };
    let mut streams: Vec<Stream> = Vec::with_capacity(cfgs.len());
    let mut opened_store = String::new();
    for c in cfgs {
        let dir = c.data_dir.clone();
        let opened = match &host {
            Some(h) => h.open_stream(c).await,
            None => TierIndex::open(c).await,
        };
        match opened {
            Ok((ti, open)) => {
                opened_store = open.store;
                // Offsets continue after everything a previous run indexed.
                let offset = ti.max_offset().map_or(Some(0), |m| m.checked_add(1));
                streams.push(Stream {
                    ti,
                    offset,
                    appended: 0,
                    flushed: 0,
                });
            }
            Err(e) => {
                // Nothing was appended, so nothing of this run is at risk; what
                // an earlier run left is still in the data directory.
                note(&format!(
                    "tierindex demo: the open of data directory {} failed: {e}\n\
                     nothing was appended by this run, so nothing needs draining from it; \
                     fix the cause, then run `tierindex drain` for what earlier runs left",
                    dir.display()
                ));
                Host::shutdown_all(streams.into_iter().map(|s| s.ti).collect(), deadline).await;
                return Ok(EXIT_ERROR);
            }
        }
    }
    let metrics: Vec<_> = streams.iter().map(|s| s.ti.metrics()).collect();
    if !cli.json {
        let data = if n == 1 {
            streams[0].ti.data_dir().display().to_string()
        } else {
            format!(
                "{} .. {} ({n} streams)",
                streams[0].ti.data_dir().display(),
                streams[streams.len() - 1].ti.data_dir().display()
            )
        };
        note(&format!(
            "tierindex demo: data {data} -> store {opened_store} ({} entries/s; Ctrl-C to stop and drain)",
            a.rate
        ));
    }
    // Stops the run early, like a signal: stdout closed under
    // --print-flushed (nobody can learn what was acknowledged any more).
    let mut stdout_gone = false;
    if a.print_flushed {
        // Entries of this run are offsets `start .. start + flushed`.
        let start = streams[0]
            .offset
            .map_or_else(|| "none left".to_string(), |o| o.to_string());
        stdout_gone |= !out_line(&format!("start {start}"));
    }
    let run_started = Instant::now();
    let mut appended = 0u64;
    let mut flushed = 0u64;
    // What stopped the run early, and which stream it happened on: only
    // that stream's report says FATAL (the others just stopped with it).
    let mut fatal: Option<(usize, String)> = None;
    let mut last_note = Instant::now();
    let mut next = Instant::now();
    'run: loop {
        if stdout_gone || signals.received() || a.entries.is_some_and(|n| appended >= n) {
            break;
        }
        // Paced by elapsed time, so any rate from 1/s up is honoured (not
        // rounded up to one entry per 10 ms tick).
        let due = (run_started.elapsed().as_secs_f64() * a.rate as f64) as u64;
        let due = a.entries.map_or(due, |n| due.min(n));
        // At most 100 ms worth (and 100 000) per tick, so a run that falls
        // behind still looks at signals between batches.
        let due = due.min(appended + (a.rate / 10).clamp(1, 100_000));
        while appended < due {
            // Entries spread over the streams in turn.
            let at = (appended % u64::from(n)) as usize;
            let s = &mut streams[at];
            let Some(offset) = s.offset else {
                fatal = Some((
                    at,
                    "this stream's data directory holds an entry at offset u64::MAX: no \
                     offset is left for the demo's next entry (use another data directory)"
                        .into(),
                ));
                break 'run;
            };
            let key = format!("key-{}", offset % a.keys);
            if let Err(e) = s.ti.append(
                key.as_bytes(),
                offset,
                100 + (offset % 900) as u32,
                now_ms(),
            ) {
                fatal = Some((at, e.to_string()));
                break 'run;
            }
            s.offset = offset.checked_add(1);
            s.appended += 1;
            appended += 1;
            if appended.is_multiple_of(a.flush_every) {
                for (i, s) in streams.iter_mut().enumerate() {
                    if let Err(e) = s.ti.flush() {
                        fatal = Some((i, e.to_string()));
                        break 'run;
                    }
                    s.flushed = s.appended;
                }
                flushed = appended;
                if a.print_flushed && !out_line(&format!("flushed {flushed}")) {
                    stdout_gone = true;
                    break;
                }
            }
        }
        if last_note.elapsed() > Duration::from_secs(5) && !cli.json {
            let pending: u64 = streams.iter().map(|s| s.ti.status().pending_segments).sum();
            note(&format!(
                "  {appended} entries in {:.0}s; pending uploads: {pending} segments",
                run_started.elapsed().as_secs_f64(),
            ));
            last_note = Instant::now();
        }
        next += Duration::from_millis(10);
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = signals.first() => break 'run,
        }
    }
    let appending = run_started.elapsed();
    if fatal.is_none() && flushed < appended {
        for (i, s) in streams.iter_mut().enumerate() {
            match s.ti.flush() {
                Ok(()) => s.flushed = s.appended,
                Err(e) => {
                    fatal = Some((i, e.to_string()));
                    break;
                }
            }
        }
        if fatal.is_none() {
            flushed = appended;
            if a.print_flushed {
                out_line(&format!("flushed {flushed}"));
            }
        }
    }
    let flushed_now: u64 = streams.iter().map(|s| s.flushed).sum();
    if let Some((at, e)) = &fatal {
        // On stderr at once (the report follows on stdout after the drain):
        // what failed, and that the drain still runs.
        let on = if n == 1 {
            String::new()
        } else {
            format!(" (stream {})", streams[*at].ti.config().stream)
        };
        note(&format!(
            "tierindex{on}: {e}\ntierindex demo: stopped appending ({flushed_now} of {appended} \
             entries acknowledged); sealing and draining what is durable within {}",
            humantime::format_duration(deadline)
        ));
    } else if stdout_gone {
        note("tierindex demo: stdout closed; stopping and draining");
    }
    let process = ProcessFigures::now();
    let names: Vec<(String, PathBuf, u64, u64)> = streams
        .iter()
        .map(|s| {
            (
                s.ti.config().stream.clone(),
                s.ti.data_dir().to_path_buf(),
                s.appended,
                s.flushed,
            )
        })
        .collect();
    // Under one deadline, a bounded number at a time (each opens a few
    // files while it shuts down).
    let reports = Host::shutdown_all(streams.into_iter().map(|s| s.ti).collect(), deadline).await;
    if n == 1 {
        let (_, dir, app, fl) = &names[0];
        let run =
            RunTotals::from_metrics(&metrics[0], *app, *fl, appending, started).with_unsealed(dir);
        let fatal = fatal.as_ref().map(|(_, e)| e.as_str());
        return Ok(print_report(cli.json, &reports[0], &run, fatal));
    }
    let mut codes = Vec::new();
    let mut pending = 0usize;
    let (mut unsealed, mut unjournaled) = (0u64, 0u64);
    let mut runs = Vec::with_capacity(names.len());
    for (i, (((name, dir, app, fl), report), m)) in
        names.iter().zip(&reports).zip(&metrics).enumerate()
    {
        let run = RunTotals::from_metrics(m, *app, *fl, appending, started).with_unsealed(dir);
        let own = fatal
            .as_ref()
            .filter(|(at, _)| *at == i)
            .map(|(_, e)| e.as_str());
        if !cli.json {
            out_line(&format!("== stream {name} (data {})", dir.display()));
            codes.push(print_report(false, report, &run, own));
        } else {
            codes.push(report_code(report, &run, own));
        }
        pending += report.drain.pending.len();
        unsealed += run.unsealed_entries;
        unjournaled += run.unjournaled_sealed;
        runs.push(run);
    }
    let code = worst(&codes);
    let drained = codes.iter().filter(|c| **c == EXIT_DRAINED).count();
    if cli.json {
        let streams = names
            .iter()
            .zip(&reports)
            .zip(&runs)
            .enumerate()
            .map(|(i, (((name, dir, _, _), report), run))| StreamOut {
                stream: name,
                data_dir: dir,
                exit: codes[i],
                report: ReportOut {
                    shutdown: report,
                    run,
                    fatal: fatal
                        .as_ref()
                        .filter(|(at, _)| *at == i)
                        .map(|(_, e)| e.as_str()),
                    losses_recorded_earlier: run.earlier_losses(report),
                },
            })
            .collect();
        let out = StreamsOut {
            streams,
            totals: StreamsTotals {
                streams: n,
                entries_appended: appended,
                entries_flushed: flushed_now,
                segments_pending: pending,
                entries_unsealed: unsealed,
                sealed_not_journaled: unjournaled,
                streams_fully_drained: drained,
                exit: code,
            },
            stopped_early: fatal.as_ref().map(|(at, e)| StoppedEarly {
                stream: &names[*at].0,
                error: e,
            }),
            process_before_drain: &process,
        };
        emit(true, &out, |_| String::new());
        return Ok(code);
    }
    if let Some((at, e)) = &fatal {
        out_line(&format!(
            "== the run stopped early: stream {} failed: {e}",
            names[*at].0
        ));
    }
    // Pending is also what is not sealed yet, and sealed files no journal
    // records (helper-67: "0 segment(s) pending" read as nothing left while
    // entries sat in active files a full disk kept from being sealed).
    let mut left = format!("{pending} segment(s) pending");
    if unsealed > 0 {
        left.push_str(&format!(", {unsealed} entries not sealed yet"));
    }
    if unjournaled > 0 {
        left.push_str(&format!(", {unjournaled} sealed file(s) not journaled"));
    }
    out_line(&format!(
        "== all {n} streams: {appended} entries appended, {flushed_now} flushed (acknowledged); \
         {left}; {drained} of {n} streams fully drained; exit {code}\n\
         == the process before the drain: {process}"
    ));
    Ok(code)
}
