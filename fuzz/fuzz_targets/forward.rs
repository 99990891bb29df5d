#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmesh_fuzz::forward(data));
