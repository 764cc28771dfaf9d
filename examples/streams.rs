//! Many streams in one process (issue 16, item 1): what each stream costs
//! while it is open and idle.
//!
//! ```text
//! cargo build --release --example streams
//! target/release/examples/streams DIR STREAMS [IDLE_SECS] [manifest|single-writer]
//! ```
//! Opens `STREAMS` indexes, one data directory each under `DIR`, on one
//! 2-thread tokio runtime: a `file://` store under `DIR/store`, 20,000-item
//! segments of 4,096 slots rolled after 60 s, the defaults otherwise (the
//! store probe, the remote manifest, whose leases the host's lease renews
//! every 10 s, one object for all of them, or with `STREAMS_HOST=0` each
//! stream its own; `single-writer`: no manifest); appends and flushes one
//! entry per stream; then measures the
//! process for `IDLE_SECS` (default 10) seconds with nothing to do; then
//! shuts every stream down under one 60 s deadline. Prints one line:
//!
//! `RESULT streams streams=N open_s=.. threads=.. fds=.. maps=.. rss_kib=..
//! idle_cpu_pct=.. shutdown_s=.. drained=D/N`
//!
//! The data directories are the streams of one [`tierindex::Host`] (one
//! lock for all: no descriptor a stream), shut down by
//! `Host::shutdown_all`; `STREAMS_HOST=0` opens each on its own (a lock
//! each) and shuts them all down at once, as builds before hosts did.
//!
//! `idle_cpu_pct` is the process's user + system CPU over the idle
//! window, in percent of one core (from `/proc/self/stat`, 10 ms ticks).
//! Its threads, by name, go to stderr. Descriptors: a host's streams keep
//! none each; with `STREAMS_HOST=0` raise `ulimit -n` above STREAMS (3 x
//! STREAMS for a build before hosts, 4 x before 4bce35b).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tierindex::{Config, TierIndex};

fn status(key: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .map(|l| l[key.len()..].trim().trim_end_matches(" kB").to_string())
        })
        .unwrap_or_default()
}

fn count_lines(path: &str) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// This process's threads by name, e.g. `tierindex-journal x8`.
fn thread_names() -> String {
    let mut names = std::collections::BTreeMap::<String, usize>::new();
    if let Ok(d) = std::fs::read_dir("/proc/self/task") {
        for t in d.flatten() {
            let n = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            *names.entry(n.trim().to_string()).or_default() += 1;
        }
    }
    names
        .iter()
        .map(|(n, c)| format!("{n} x{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// User + system CPU of this process so far, in clock ticks.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces) start
    // after the last ')'; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let at = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    at(14) + at(15)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(dir), Some(n)) = (args.first(), args.get(1)) else {
        eprintln!("usage: streams DIR STREAMS [IDLE_SECS]");
        std::process::exit(2);
    };
    let dir = PathBuf::from(dir);
    let n: usize = n.parse()?;
    let idle: u64 = args.get(2).map_or(Ok(10), |s| s.parse())?;
    let manifest = match args.get(3).map(String::as_str) {
        None | Some("manifest") => true,
        Some("single-writer") => false,
        Some(other) => {
            eprintln!("streams: mode {other:?}: manifest or single-writer");
            std::process::exit(2);
        }
    };
    let store = format!("file://{}", dir.join("store").display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let t = Instant::now();
        // STREAMS_OPEN_CONCURRENCY opens that many at a time (default 1:
        // one after another), as a broker starting its partitions may.
        let concurrency: usize = std::env::var("STREAMS_OPEN_CONCURRENCY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
            .max(1);
        // STREAMS_SEGMENT_ITEMS / STREAMS_SLOTS: the segments' geometry
        // (default 20,000 items and 4,096 slots; the library's own default
        // is 1,048,576 and 65,536).
        let env_u32 = |k: &str, d: u32| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        let (items, slots) = (
            env_u32("STREAMS_SEGMENT_ITEMS", 20_000),
            env_u32("STREAMS_SLOTS", 4_096),
        );
        let configs = (0..n).map(|i| {
            let cfg = Config::builder(dir.join(format!("data-{i}")))
                .stream(format!("s{i}"))
                .store(store.clone())
                .segment_items(items)
                .slot_count(slots)
                .segment_max_age(Some(Duration::from_secs(60)));
            if manifest {
                // STREAMS_LEASE_TTL_MS: the manifest lease's TTL (default
                // 30 s; each stream renews it at a third of that).
                match std::env::var("STREAMS_LEASE_TTL_MS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                {
                    Some(ms) => cfg.lease_ttl(Duration::from_millis(ms)),
                    None => cfg,
                }
            } else {
                cfg.single_writer_mode()
            }
            .build()
        });
        use futures::StreamExt as _;
        let host = match std::env::var("STREAMS_HOST").as_deref() {
            Ok("0") => None,
            _ => Some(tierindex::Host::open(&dir)?),
        };
        let host = &host;
        let opened: Vec<Result<TierIndex, Box<dyn std::error::Error>>> =
            futures::stream::iter(configs)
                .map(|cfg| async move {
                    let (ti, _) = match host {
                        Some(h) => h.open_stream(cfg?).await?,
                        None => TierIndex::open(cfg?).await?,
                    };
                    Ok::<_, Box<dyn std::error::Error>>(ti)
                })
                .buffered(concurrency)
                .collect()
                .await;
        let mut streams = Vec::with_capacity(n);
        for s in opened {
            streams.push(s?);
        }
        let open_s = t.elapsed().as_secs_f64();
        for (i, s) in streams.iter().enumerate() {
            s.append(b"key", i as u64, 1, 1_000)?;
            s.flush()?;
        }
        // Let the open's own work settle, then measure an idle window.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (c0, w0) = (cpu_ticks(), Instant::now());
        tokio::time::sleep(Duration::from_secs(idle)).await;
        let ticks = cpu_ticks() - c0;
        let idle_cpu_pct = ticks as f64 / 100.0 / w0.elapsed().as_secs_f64() * 100.0;
        let (threads, fds, maps, rss) = (
            status("Threads:"),
            fds(),
            count_lines("/proc/self/maps"),
            status("VmRSS:"),
        );
        eprintln!("threads: {}", thread_names());
        let t = Instant::now();
        let deadline = Duration::from_secs(60);
        let reports = if host.is_some() {
            tierindex::Host::shutdown_all(streams, deadline).await
        } else {
            futures::future::join_all(streams.into_iter().map(|s| s.shutdown(deadline))).await
        };
        let shutdown_s = t.elapsed().as_secs_f64();
        let drained = reports.iter().filter(|r| r.fully_drained()).count();
        // Why the others were not: the first few, in full.
        for (i, r) in reports
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.fully_drained())
            .take(5)
        {
            eprintln!(
                "not drained: stream {i}: error {:?}, fenced {:?}, pending {:?}, quarantined {}",
                r.error,
                r.fenced,
                r.drain.pending,
                r.drain.quarantined.len()
            );
        }
        println!(
            "RESULT streams streams={n} open_s={open_s:.2} threads={threads} fds={fds} \
             maps={maps} rss_kib={rss} idle_cpu_pct={idle_cpu_pct:.2} shutdown_s={shutdown_s:.2} \
             drained={drained}/{n}"
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
