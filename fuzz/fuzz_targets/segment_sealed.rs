//! Fuzz target `segment_sealed`: check_sealed (footer, header, data/dir/item CRCs, slot directory, slot placement), then SealedSegment::open + lookup on what it accepts.
//! Input layout and properties: `tierindex_fuzz::sealed` (fuzz/src/lib.rs).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = SCRATCH.get_or_init(tierindex_fuzz::process_scratch_dir);
    tierindex_fuzz::sealed(data, dir);
});
