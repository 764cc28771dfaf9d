//! Build an upload backlog: a data directory whose broker went down with N
//! sealed, journaled (`Sealed`), never-uploaded segments. Used by
//! `scripts/bench-drain.sh`; `tierindex drain` / `tierindex demo` then
//! upload it.
//!
//! ```text
//! cargo run --release --example make_backlog -- DATA_DIR SEGMENTS ITEMS [SLOTS]
//! ```
//! Sealed file size = 64 + (SLOTS+1)*4 + ITEMS*32 + 128 bytes; SLOTS
//! defaults to 4096. DATA_DIR must not exist yet (or be empty). No store is
//! contacted: this is exactly the state of a broker that sealed segments
//! while its store was unreachable and then stopped.
//!
//! `KEYS` (environment, default 100,000): distinct keys, cycled over.
//!
//! Prints one line: `backlog DIR segments=N bytes=B seal_ms=T`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tierindex::datadir::DataDir;
use tierindex::index::{IndexConfig, IndexWriter};
use tierindex::journal::{Journal, JournalOptions, Record};
use tierindex::segment::now_ms;
use tierindex::{Entry, key_hash};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: make_backlog DATA_DIR SEGMENTS ITEMS [SLOTS]");
        std::process::exit(2);
    }
    let dir = PathBuf::from(&args[0]);
    let segments: u64 = args[1].parse()?;
    let items: u32 = args[2].parse()?;
    let slots: u32 = args.get(3).map_or(Ok(4096), |s| s.parse())?;
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        return Err(format!("{} exists and is not empty", dir.display()).into());
    }
    let started = Instant::now();
    let dd = DataDir::open(&dir)?;
    let cfg = IndexConfig {
        slot_count: slots,
        segment_items: items,
        segment_max_age: None,
        ..IndexConfig::default()
    };
    let (mut w, _) = IndexWriter::open(dd, cfg, None, None)?;
    // KEYS distinct keys (env, default 100 000), offsets and timestamps
    // increasing like a log: key k is at offsets k, k + KEYS, ...
    let keys: u64 = std::env::var("KEYS").map_or(Ok(100_000), |s| s.parse())?;
    let ts0 = now_ms();
    let total = segments * u64::from(items);
    let mut metas = Vec::new();
    for off in 0..total {
        let k = off % keys.max(1);
        w.append_entry(Entry {
            key_hash: key_hash(&k.to_le_bytes()),
            offset: off,
            size: 100 + (off % 900) as u32,
            timestamp_ms: ts0 + off / 1000,
        })?;
        if off % (1 << 20) == 0 {
            metas.extend(w.poll_sealed()?);
        }
    }
    w.flush()?;
    // Seals the last (full) active segment and waits for every seal.
    metas.extend(w.close(Instant::now() + Duration::from_secs(600))?);
    drop(w);
    metas.sort_by_key(|m| m.id);
    let bytes: u64 = metas.iter().map(|m| m.file_len).sum();
    let n = metas.len();
    // Journal them, as the broker's pipeline would have before going down
    // (once the closed writer's sealer thread let go of the directory).
    let until = Instant::now() + Duration::from_secs(60);
    let (mut j, _) = loop {
        match Journal::open(&dir, JournalOptions::default()) {
            Err(tierindex::Error::Locked { .. }) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(5))
            }
            r => break r?,
        }
    };
    let recs: Vec<Record> = metas
        .into_iter()
        .map(|meta| Record::Sealed { meta })
        .collect();
    // In batches: one frame holds at most 16 MiB.
    for batch in recs.chunks(10_000) {
        j.append(batch)?;
    }
    drop(j);
    println!(
        "backlog {} segments={n} bytes={bytes} seal_ms={}",
        dir.display(),
        started.elapsed().as_millis()
    );
    Ok(())
}
