//! Fuzz target `segment_active`: check_active and read_entries on a file, and ActiveSegment::open on it (differential: the read-only check must predict open).
//! Input layout and properties: `tierindex_fuzz::active` (fuzz/src/lib.rs).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = SCRATCH.get_or_init(tierindex_fuzz::process_scratch_dir);
    tierindex_fuzz::active(data, dir);
});
