//! `tierindex demo`: a simulated broker on the embedded default store.
//!
//! Appends entries at a fixed rate, flushes every `--flush-every` entries
//! (printing `start <first-offset>` once and `flushed <count>` after each
//! flush when `--print-flushed`, so a test can check that everything
//! acknowledged survives a kill), and on Ctrl-C or
//! SIGTERM shuts down: seal, drain within the deadline, report.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

use crate::cli::drain::{RunTotals, parse_deadline, print_report};
use crate::cli::{Cli, note, out_line};
use crate::config::{SEGMENT_ITEMS_MAX, SLOT_COUNT_MAX};
use crate::error::Result;
use crate::lifecycle::{EXIT_ERROR, ShutdownSignals};
use crate::segment::now_ms;
use crate::tier::TierIndex;

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
    let mut signals = ShutdownSignals::install()?;
    let (ti, open) = match TierIndex::open(cfg).await {
        Ok(x) => x,
        Err(e) => {
            // Nothing was appended, so nothing of this run is at risk; what
            // an earlier run left is still in the data directory.
            note(&format!(
                "tierindex demo: cannot open the data directory or the store: {e}\n\
                 nothing was appended by this run, so nothing needs draining from it; \
                 fix the cause, then run `tierindex drain` for what earlier runs left"
            ));
            return Ok(EXIT_ERROR);
        }
    };
    let metrics = ti.metrics();
    let deadline = a
        .deadline
        .unwrap_or(Duration::from_millis(ti.config().shutdown_deadline_ms));
    // Offsets continue after everything a previous run indexed.
    let mut offset = ti.max_offset().map_or(0, |m| m + 1);
    if !cli.json {
        note(&format!(
            "tierindex demo: data {} -> store {} ({} entries/s; Ctrl-C to stop and drain)",
            ti.data_dir().display(),
            open.store,
            a.rate
        ));
    }
    // Stops the run early, like a signal: stdout closed under
    // --print-flushed (nobody can learn what was acknowledged any more).
    let mut stdout_gone = false;
    if a.print_flushed {
        // Entries of this run are offsets `start .. start + flushed`.
        stdout_gone |= !out_line(&format!("start {offset}"));
    }
    let run_started = Instant::now();
    let mut appended = 0u64;
    let mut flushed = 0u64;
    let mut fatal: Option<String> = None;
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
            let key = format!("key-{}", offset % a.keys);
            if let Err(e) = ti.append(
                key.as_bytes(),
                offset,
                100 + (offset % 900) as u32,
                now_ms(),
            ) {
                fatal = Some(e.to_string());
                break 'run;
            }
            offset += 1;
            appended += 1;
            if appended.is_multiple_of(a.flush_every) {
                if let Err(e) = ti.flush() {
                    fatal = Some(e.to_string());
                    break 'run;
                }
                flushed = appended;
                if a.print_flushed && !out_line(&format!("flushed {flushed}")) {
                    stdout_gone = true;
                    break;
                }
            }
        }
        if last_note.elapsed() > Duration::from_secs(5) && !cli.json {
            let st = ti.status();
            note(&format!(
                "  {appended} entries in {:.0}s; pending uploads: {} segments",
                run_started.elapsed().as_secs_f64(),
                st.pending_segments
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
        match ti.flush() {
            Ok(()) => {
                flushed = appended;
                if a.print_flushed {
                    out_line(&format!("flushed {flushed}"));
                }
            }
            Err(e) => fatal = Some(e.to_string()),
        }
    }
    if let Some(e) = &fatal {
        // On stderr at once (the report follows on stdout after the drain):
        // what failed, and that the drain still runs.
        note(&format!(
            "tierindex: {e}\ntierindex demo: stopped appending ({flushed} of {appended} \
             entries acknowledged); sealing and draining what is durable within {}",
            humantime::format_duration(deadline)
        ));
    } else if stdout_gone {
        note("tierindex demo: stdout closed; stopping and draining");
    }
    let report = ti.shutdown(deadline).await;
    let run = RunTotals::from_metrics(&metrics, appended, flushed, appending, started);
    Ok(print_report(cli.json, &report, &run, fatal.as_deref()))
}
