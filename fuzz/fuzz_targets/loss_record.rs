#![no_main]
//! cargo-fuzz target: see `cotal_tests::fuzz_entry::loss_record`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cotal_tests::fuzz_entry::loss_record(data);
});
