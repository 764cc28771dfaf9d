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

use crate::cli::{Cli, drain::print_report};
use crate::error::Result;
use crate::lifecycle::ShutdownSignals;
use crate::segment::now_ms;
use crate::tier::TierIndex;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Items per segment (small values roll and upload many segments).
    #[arg(long, default_value_t = 20_000)]
    pub segment_items: u32,
    /// Hash slots per segment.
    #[arg(long, default_value_t = 4096)]
    pub slots: u32,
    /// Entries appended per second.
    #[arg(long, default_value_t = 100_000)]
    pub rate: u64,
    /// Stop by itself after this many entries (default: run until a signal).
    #[arg(long)]
    pub entries: Option<u64>,
    /// Distinct message keys.
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// Flush (msync) after this many appends.
    #[arg(long, default_value_t = 1000)]
    pub flush_every: u64,
    /// Print `flushed N` after each flush (N = entries durable so far).
    #[arg(long)]
    pub print_flushed: bool,
    /// Drain deadline at shutdown (default: the config's shutdown_deadline_ms, 20 s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub deadline: Option<Duration>,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    pub metrics_addr: Option<String>,
}

pub async fn run(cli: &Cli, a: &DemoArgs) -> Result<i32> {
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
    let (ti, open) = TierIndex::open(cfg).await?;
    let deadline = a
        .deadline
        .unwrap_or(Duration::from_millis(ti.config().shutdown_deadline_ms));
    // Offsets continue after everything a previous run indexed.
    let mut offset = ti.max_offset().map_or(0, |m| m + 1);
    if !cli.json {
        eprintln!(
            "tierindex demo: data {} -> store {} ({} entries/s; Ctrl-C to stop and drain)",
            ti.data_dir().display(),
            open.store,
            a.rate
        );
    }
    if a.print_flushed {
        // Entries of this run are offsets `start .. start + flushed`.
        println!("start {offset}");
    }
    let started = Instant::now();
    let batch = (a.rate / 100).max(1);
    let mut next = Instant::now();
    let mut appended = 0u64;
    let mut last_note = Instant::now();
    // An append or flush failure (ENOSPC, a failed msync) ends the run, but
    // never skips the shutdown report: what was acknowledged still drains.
    let mut failed: Option<crate::error::Error> = None;
    'run: loop {
        if signals.received() || a.entries.is_some_and(|n| appended >= n) {
            break;
        }
        for _ in 0..batch {
            if a.entries.is_some_and(|n| appended >= n) {
                break;
            }
            let key = format!("key-{}", offset % a.keys.max(1));
            if let Err(e) = ti.append(
                key.as_bytes(),
                offset,
                100 + (offset % 900) as u32,
                now_ms(),
            ) {
                failed = Some(e);
                break 'run;
            }
            offset += 1;
            appended += 1;
            if appended.is_multiple_of(a.flush_every.max(1)) {
                if let Err(e) = ti.flush() {
                    failed = Some(e);
                    break 'run;
                }
                if a.print_flushed {
                    println!("flushed {appended}");
                }
            }
        }
        if last_note.elapsed() > Duration::from_secs(5) && !cli.json {
            let st = ti.status();
            eprintln!(
                "  {appended} entries in {:.0}s; pending uploads: {} segments",
                started.elapsed().as_secs_f64(),
                st.pending_segments
            );
            last_note = Instant::now();
        }
        next += Duration::from_millis(10);
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = signals.first() => break 'run,
        }
    }
    if failed.is_none() {
        match ti.flush() {
            Ok(()) if a.print_flushed => println!("flushed {appended}"),
            Ok(()) => {}
            Err(e) => failed = Some(e),
        }
    }
    if let Some(e) = &failed {
        eprintln!("tierindex demo: stopped: {e}; shutting down and draining what was acknowledged");
    }
    let report = ti.shutdown(deadline).await;
    let code = print_report(cli.json, &report);
    // A run cut short by an error exits 1 (the error), unless the report
    // itself needs an operator (loss, quarantine) or the stream was fenced.
    use crate::lifecycle::{EXIT_ERROR, EXIT_FENCED, EXIT_NEEDS_OPERATOR};
    Ok(
        if failed.is_some() && code != EXIT_NEEDS_OPERATOR && code != EXIT_FENCED {
            EXIT_ERROR
        } else {
            code
        },
    )
}
