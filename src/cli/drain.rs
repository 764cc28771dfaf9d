//! `tierindex drain`: the standalone recovery tool.
//!
//! Opens the data directory exactly as the broker would (recovery, leftover
//! seals, journal replay), seals whatever active segment is left, uploads and
//! verifies everything pending within the deadline, and exits with a code
//! that says what is left.

use std::time::Duration;

use clap::Args;

use crate::cli::{Cli, emit};
use crate::error::Result;
use crate::lifecycle::{
    EXIT_DRAINED, EXIT_FENCED, EXIT_NEEDS_OPERATOR, EXIT_PENDING, ShutdownSignals,
};
use crate::tier::{ShutdownReport, TierIndex};

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// Give up (recording what is left) after this long, e.g. 30s, 5m.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
}

pub async fn run(cli: &Cli, a: &DrainArgs) -> Result<i32> {
    let cfg = cli.config()?;
    // A second signal exits at once; the journal makes that safe.
    let _signals = ShutdownSignals::install()?;
    let (ti, open) = TierIndex::open(cfg).await?;
    if !cli.json {
        eprintln!(
            "tierindex drain: {} (previous shutdown {}; {} quarantined at open)",
            open.store,
            if open.previous_shutdown_clean {
                "clean"
            } else {
                "NOT clean"
            },
            open.segments.quarantined.len()
        );
        for n in &open.notes {
            eprintln!("  note: {n}");
        }
    }
    let pending = ti.status().pending_segments;
    let bar = progress(pending, cli.json);
    let m = ti.metrics();
    let ticker = {
        let bar = bar.clone();
        tokio::spawn(async move {
            loop {
                bar.set_position(m.segments_committed.get());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let report = ti.shutdown(a.deadline).await;
    ticker.abort();
    bar.finish_and_clear();
    Ok(print_report(cli.json, &report))
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

/// Print a shutdown/drain report and return the exit code it implies.
pub fn print_report(json: bool, r: &ShutdownReport) -> i32 {
    emit(json, r, |r| {
        let mut s = format!(
            "sealed at shutdown: {}\nuploaded+verified: {} segments, {} bytes in {} ms\npending: {}\nquarantined: {}\nclean marker: {}",
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
            s.push_str(&format!(
                "\nLOST to local damage: {} entries",
                r.lost_items()
            ));
            for n in &r.lost {
                s.push_str(&format!("\n  lost {}", n.line()));
            }
        }
        if let Some(e) = &r.error {
            s.push_str(&format!("\nerror: {e}"));
        }
        s
    });
    if let Some(why) = &r.fenced {
        eprintln!(
            "tierindex: FENCED: another owner took the stream's manifest ({why}); \
             uploads stopped, uncommitted segments stay Verified with their local files"
        );
        EXIT_FENCED
    } else if !r.drain.quarantined.is_empty() || !r.lost.is_empty() {
        EXIT_NEEDS_OPERATOR
    } else if r.fully_drained() {
        EXIT_DRAINED
    } else {
        EXIT_PENDING
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::DrainReport;

    fn report(fenced: Option<&str>) -> ShutdownReport {
        ShutdownReport {
            sealed_at_shutdown: 0,
            drain: DrainReport::default(),
            clean_marker_written: fenced.is_none(),
            error: fenced.map(|f| format!("fenced: {f}")),
            fenced: fenced.map(str::to_string),
            elapsed_ms: 0,
            lost: Vec::new(),
        }
    }

    #[test]
    fn a_fence_exits_with_its_own_code() {
        assert_eq!(print_report(true, &report(None)), EXIT_DRAINED);
        assert_eq!(
            print_report(true, &report(Some("epoch 2 (owner \"b\")"))),
            EXIT_FENCED
        );
    }
}
