//! The raw `object_store` PUT ceiling for a set of files: what the store and
//! this client can take with no journal, no conditional create, no
//! verification. Used by `scripts/bench-drain.sh` as the reference for
//! `tierindex drain`.
//!
//! ```text
//! cargo run --release --example put_ceiling -- STORE_URL DIR CONCURRENCY PREFIX [--reads=N]
//! ```
//! - STORE_URL: `s3://bucket[/prefix]` (endpoint and credentials from the
//!   usual `AWS_*` variables) or `file:///abs/dir`, built exactly as
//!   tierindex builds its store (`RemoteStore::from_url`, same timeouts and
//!   retry configuration).
//! - DIR: every `*.seg` file in it is uploaded, each once, to
//!   `PREFIX/<file name>`, with at most CONCURRENCY requests in flight. Each
//!   file is read from disk inside the timed section (as tierindex and
//!   rclone do). Plain `put_opts` with default options (overwrite mode, no
//!   metadata), single request per file.
//! - `--reads=N`: after each PUT, GET the whole object back N times and
//!   CRC32 each body (a model of an upload that reads every object back N
//!   times; default 0).
//! - `--no-checksum`: no `x-amz-checksum-crc64nvme` header (tierindex sends
//!   one with every PUT; this is the ceiling without it).
//! - `--unsigned-payload`: the body's SHA-256 left out of the signature
//!   (`UNSIGNED-PAYLOAD`, the checksum header kept), through the client
//!   tierindex uses for segment bodies where the probe proved the server
//!   validates that header (HTTPS or loopback endpoints only).
//!
//! Prints `put_ceiling concurrency=C reads=R files=N bytes=B ms=T mb_per_s=X`
//! (MB = 10^6 bytes; B counts uploaded bytes only, not bytes read back).

use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{GetOptions, PutOptions, PutPayload};
use tierindex::remote::{RemoteStore, StoreOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!(
            "usage: put_ceiling STORE_URL DIR CONCURRENCY PREFIX [--reads=N] [--no-checksum] [--unsigned-payload]"
        );
        std::process::exit(2);
    }
    let checksums = !args.iter().skip(4).any(|a| a == "--no-checksum");
    let opts = StoreOptions {
        s3_checksums: checksums,
        ..StoreOptions::default()
    };
    let store = RemoteStore::from_url(&args[0], &opts)?;
    let unsigned = args.iter().skip(4).any(|a| a == "--unsigned-payload");
    if unsigned && !store.has_unsigned_body_client() {
        return Err("--unsigned-payload: this store has no unsigned-payload client (S3 over HTTPS or a loopback endpoint only)".into());
    }
    let dir = PathBuf::from(&args[1]);
    let concurrency: usize = args[2].parse()?;
    let prefix = store.prefix().clone().join(args[3].as_str());
    let reads: u32 = match args.iter().skip(4).find_map(|a| a.strip_prefix("--reads=")) {
        Some(n) => n.parse()?,
        None => 0,
    };

    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no .seg files in {}", dir.display()).into());
    }
    let os = store.body_store(unsigned).clone();
    let started = Instant::now();
    let bytes: u64 = futures::stream::iter(files.iter().cloned())
        .map(|path| {
            let os = os.clone();
            let key: Path = prefix.clone().join(
                path.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("unnamed.seg"),
            );
            async move {
                let data = Bytes::from(tokio::fs::read(&path).await?);
                let len = data.len() as u64;
                let crc = crc32fast::hash(&data);
                os.put_opts(&key, PutPayload::from(data), PutOptions::default())
                    .await?;
                for _ in 0..reads {
                    let body = os.get_opts(&key, GetOptions::new()).await?.bytes().await?;
                    if body.len() as u64 != len || crc32fast::hash(&body) != crc {
                        return Err(format!("{key}: read back differs").into());
                    }
                }
                Ok::<u64, Box<dyn std::error::Error>>(len)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
        .await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "put_ceiling concurrency={concurrency} reads={reads} checksum={checksums} unsigned={unsigned} files={} bytes={bytes} ms={:.0} mb_per_s={:.1}",
        files.len(),
        secs * 1000.0,
        bytes as f64 / secs / 1e6,
    );
    Ok(())
}
