//! Heap allocations per request (issue 4), counted by a counting global allocator.
//!
//! `cargo bench --bench allocs` prints, for 1,000 requests after 100 of warm-up, the
//! allocations, reallocations and bytes asked for per request, from `poll_ready` to the
//! response dropped (building the request is not counted). `tests/allocations.rs` asserts
//! that the key-fallback happy path allocates no more than `limit`.

mod common;
use common::counting::{self, PerRequest};
use common::*;

#[global_allocator]
static ALLOC: counting::Counting = counting::Counting;

const WARM_UP: usize = 100;
const N: usize = 1000;

fn row(name: &str, m: PerRequest) {
    println!(
        "| `{name}` | {:.2} | {:.2} | {:.0} |",
        m.allocs, m.reallocs, m.bytes
    );
}

fn main() {
    // `cargo bench -- <filter>` hands the filter to every bench binary; this one is quick
    // and always runs in full.
    println!("allocations per request (average of {N} after {WARM_UP} of warm-up):");
    println!();
    println!("| service | allocations | reallocations | bytes |");
    println!("|---|---:|---:|---:|");
    row("bare", counting::per_request(&mut bare(), WARM_UP, N));
    row(
        "set_header",
        counting::per_request(&mut set_header(), WARM_UP, N),
    );
    let limit = counting::per_request(&mut limit(), WARM_UP, N);
    row("limit", limit);
    row(
        "tower_retry",
        counting::per_request(&mut tower_retry(), WARM_UP, N),
    );
    let happy = counting::per_request(&mut key_fallback(), WARM_UP, N);
    row("key_fallback/happy", happy);
    row(
        "key_fallback/one_429",
        counting::per_request(&mut key_fallback_one_429(), WARM_UP, N),
    );
    row(
        "key_fallback/keys_1000",
        counting::per_request(&mut key_fallback_keys_1000(), WARM_UP, N),
    );
    println!();
    println!(
        "key_fallback/happy allocates {:+.2} per request next to limit: {}",
        happy.allocs - limit.allocs,
        if happy.allocs <= limit.allocs {
            "target met"
        } else {
            "TARGET MISSED"
        }
    );
}
