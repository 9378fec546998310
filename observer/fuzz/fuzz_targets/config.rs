//! Bytes in, observer::fuzzing::config out: see that function for what the bytes stand for.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| observer::fuzzing::config(data));
