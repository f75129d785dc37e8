//! The `.env` parser, and the merge into a key set of what it parsed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tower_key_fallback_fuzz::dotenv(data));
