//! Bytes in, observer::fuzzing::sock_diag out: see that function for what the bytes stand for.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| observer::fuzzing::sock_diag(data));
