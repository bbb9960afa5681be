#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    needle_fuzz::index(data);
});
