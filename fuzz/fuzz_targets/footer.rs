//! Fuzz target `footer`: Footer::decode, Header::decode, decode_sealed_item, decode_active_item, decode_slot_dir on their own.
//! Input layout and properties: `tierindex_fuzz::footer` (fuzz/src/lib.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tierindex_fuzz::footer(data);
});
