//! The key-fallback happy path allocates no more than the least a layer able to replay
//! must (issue 4): one copy of the request plus the credential header (`limit`).
//!
//! A count, not a time, so it can be asserted. The shared bench code builds the services;
//! `cargo bench --bench allocs` prints the same figures for every variant.

#[path = "../benches/common/mod.rs"]
mod common;
use common::counting;
use common::*;

#[global_allocator]
static ALLOC: counting::Counting = counting::Counting;

#[test]
fn happy_path_allocates_no_more_than_limit() {
    let limit = counting::per_request(&mut limit(), 100, 1000);
    let happy = counting::per_request(&mut key_fallback(), 100, 1000);
    println!("limit {limit:?}\nkey_fallback {happy:?}");
    assert!(limit.allocs > 0.0, "the counter counts");
    assert!(
        happy.allocs <= limit.allocs,
        "key_fallback/happy makes {} allocations per request, limit {}",
        happy.allocs,
        limit.allocs
    );
}
