//! Fuzz target `journal_replay`: journal decode_file and replay_bytes: raw bytes, checksummed JSON frames, and a model-based writer.
//! Input layout and properties: `tierindex_fuzz::journal` (fuzz/src/lib.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tierindex_fuzz::journal(data);
});
