//! Feature `redis`, as a user sees it: three replicas in front of one provider, over real
//! loopback HTTP (hyper-util's client in each layer, the fake provider on 127.0.0.1), with and
//! without a real `redis-server` between them, counting the upstream 429s the replicas spend.
//! Each run prints its figures (`cargo test --features redis --test redis_scenarios --
//! --nocapture`). Every loop is bounded in count and time.
#![cfg(feature = "redis")]

#[path = "support/redis.rs"]
mod redis_server;
#[path = "support/replicas.rs"]
mod replicas;

use std::time::Duration;

use redis_server::RedisServer;
use replicas::{scenario, REQUESTS};

/// The provider answers after 50 ms (a fast model's answer; `benches/shared_state.rs` also
/// runs it answering at once).
async fn run(replicas: usize, in_flight: usize, redis: Option<(&str, &str)>) -> u64 {
    scenario(replicas, in_flight, Duration::from_millis(50), redis).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_waste_no_more_than_one_alone() {
    let redis = RedisServer::start();
    let url = redis.url();
    // One request at a time: what one replica learns reaches the others before their next
    // request, so together they waste what one alone would.
    let shared = run(3, 1, Some((&url, "three-1"))).await;
    let apart = run(3, 1, None).await;
    let alone = run(1, 1, None).await;
    println!(
        "three replicas, {REQUESTS} requests round-robin, one at a time: upstream 429s {shared} \
         with Redis, {apart} without, {alone} for one replica alone"
    );
    assert!(
        shared <= alone,
        "with Redis {shared} > one replica alone {alone}"
    );
    assert!(
        apart > alone,
        "the run without Redis shows what sharing saves"
    );
    // Eight in flight, the figures only: replicas that choose a key in the same fraction
    // of a millisecond cannot know of each other's requests (nothing on the request path
    // waits for Redis), and how many do varies from run to run (`benches/shared_state.rs`
    // prints five runs).
    let shared = run(3, 8, Some((&url, "three-8"))).await;
    let apart = run(3, 8, None).await;
    println!(
        "three replicas, {REQUESTS} requests round-robin, 8 in flight: upstream 429s {shared} \
         with Redis, {apart} without"
    );
}
