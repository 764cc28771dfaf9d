//! `tierindex lookup KEY --remote` finds entries whose local copies were
//! released, on the embedded `file://` store, with and without the manifest.

use std::path::Path;
use std::process::Output;

mod common;

fn run(cfg: &Path, args: &[&str]) -> Output {
    common::run_with_config(cfg, args)
}

fn lookup(cfg: &Path, key: &str, remote: bool) -> serde_json::Value {
    let mut args = vec!["--json", "lookup", key];
    if remote {
        args.push("--remote");
    }
    let o = run(cfg, &args);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn offsets(v: &serde_json::Value) -> Vec<u64> {
    let mut o: Vec<u64> = v["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["offset"].as_u64().unwrap())
        .collect();
    o.sort();
    o
}

fn case(manifest: bool) {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("t.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nstore = \"file://{}\"\nrelease_after_commit = true\nmanifest = {manifest}\n\
             owner_id = \"broker-1\"\nprobe_store = true\n",
            d.path().join("data").display().to_string(),
            d.path().join("store").display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(d.path().join("store")).unwrap();
    let o = run(&cfg, &common::small_demo("2000"));
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // demo keys: key-{offset % 16}
    let local = lookup(&cfg, "key-5", false);
    let all = lookup(&cfg, "key-5", true);
    let want: Vec<u64> = (0..2000).filter(|o| o % 16 == 5).collect();
    assert_eq!(offsets(&all), want, "manifest={manifest}: {all}");
    assert!(
        offsets(&local).len() < want.len(),
        "manifest={manifest}: local copies were not released: {local}"
    );
    assert!(all["remote_segments"].as_u64().unwrap() >= 6, "{all}");
}

#[test]
fn remote_lookup_without_manifest_uses_released_journal_records() {
    case(false);
}

#[test]
fn remote_lookup_with_manifest_reads_the_committed_list() {
    case(true);
}
