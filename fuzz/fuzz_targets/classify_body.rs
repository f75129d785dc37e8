//! The input as a response (status line, header lines, blank line, body) through
//! `classify_head` and `classify_body`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tower_key_fallback_fuzz::classify_body(data));
