//! Every header-value parser (Go durations, seconds, milliseconds, Retry-After, RFC 3339
//! resets, body hints) on the input, and the input in every header `classify_head` reads.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tower_key_fallback_fuzz::header_parsers(data));
