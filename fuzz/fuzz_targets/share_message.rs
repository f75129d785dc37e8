//! The shared key state's messages (feature `redis`), as a hostile or broken Redis could hand
//! them over: never a panic, and what reads writes back as itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tower_key_fallback_fuzz::share_message(data));
