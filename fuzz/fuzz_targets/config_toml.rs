//! Fuzz target `config_toml`: Config::from_toml, plus the serialize/parse round trip of what it accepts.
//! Input layout and properties: `tierindex_fuzz::config` (fuzz/src/lib.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tierindex_fuzz::config(data);
});
