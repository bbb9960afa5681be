#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    needle_fuzz::csv_log(data);
});
