//! Bytes in, observer::fuzzing::btf out: see that function for what the bytes stand for.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| observer::fuzzing::btf(data));
