//! Feature `redis`: what sharing key state through Redis costs and buys, against a real
//! `redis-server` started here on a free loopback port (`apt-get install -y redis-server`).
//!
//! `cargo bench --features redis --bench shared_state` prints:
//!
//! - **propagation**: a cooldown set on one replica, until the other replica's pool has it
//!   (its observer is told from inside the merge): p50, p99 and the largest over 1,000 events,
//!   one after the other;
//! - **three replicas**: keys of 5 per 10 s, 5 per 10 s and unlimited, 60 requests spread
//!   round-robin over three replicas (in-process layers, each with its own store, over
//!   loopback HTTP to the fake provider), one at a time and 8 in flight: the upstream 429s,
//!   with Redis, without, and for one replica alone; with the fake provider answering at once
//!   and after 50 ms (a fast model's answer).
//!
//! Figures, not timings of a loop: this harness is not criterion's.

#[path = "../tests/support/redis.rs"]
mod redis_server;
#[path = "../tests/support/replicas.rs"]
mod replicas;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use redis_server::RedisServer;
use replicas::{scenario, KEYS, REQUESTS};
use tower_key_fallback::{KeyEvent, KeyEvents, KeyFallbackLayer, KeySet, RedisStore};

const EVENTS: usize = 1000;
const RUNS: usize = 5;

/// No logs: they would time the terminal.
struct Quiet;

impl KeyEvents for Quiet {
    fn on_event(&self, _: &KeyEvent<'_>) {}
}

/// Tells when a cooldown reached this pool.
struct Arrivals(mpsc::Sender<Instant>);

impl KeyEvents for Arrivals {
    fn on_event(&self, event: &KeyEvent<'_>) {
        if let KeyEvent::CooledDown { .. } = event {
            let _ = self.0.send(Instant::now());
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn propagation(url: &str) {
    let keys = || KeySet::new(KEYS).unwrap();
    let here = KeyFallbackLayer::builder(keys())
        .events(Quiet)
        .shared_state(RedisStore::connect(url, "propagation").await.unwrap())
        .build()
        .handle();
    let (tx, rx) = mpsc::channel();
    let _there = KeyFallbackLayer::builder(keys())
        .events(Arrivals(tx))
        .shared_state(RedisStore::connect(url, "propagation").await.unwrap())
        .build();
    let mut took = Vec::with_capacity(EVENTS);
    for i in 0..EVENTS {
        // Each cooldown ends later than the last, so each changes the other pool.
        let d = Duration::from_secs(600) + Duration::from_millis(10 * i as u64);
        let start = Instant::now();
        here.cool_down("key-1", d).unwrap();
        let at = tokio::task::block_in_place(|| rx.recv_timeout(Duration::from_secs(5)))
            .expect("a cooldown did not reach the other replica within 5 s");
        took.push(at - start);
    }
    took.sort();
    println!(
        "propagation of a cooldown between two replicas, {EVENTS} events: p50 {:?}, p99 {:?}, max {:?}",
        percentile(&took, 0.5),
        percentile(&took, 0.99),
        took[EVENTS - 1]
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter that names nothing here runs nothing.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    if filter.is_some_and(|f| !"shared_state".contains(&f)) {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let redis = RedisServer::start();
    let url = redis.url();
    runtime.block_on(async {
        propagation(&url).await;
        let mut run = 0;
        for latency in [Duration::ZERO, Duration::from_millis(50)] {
            for in_flight in [1, 8] {
                // Each run starts cold (new replicas, a new provider, a new namespace), and
                // requests in flight race: five runs each, every figure printed.
                let (mut shared, mut apart, mut alone) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..RUNS {
                    run += 1;
                    let ns = format!("replicas-{run}");
                    shared.push(scenario(3, in_flight, latency, Some((&url, &ns))).await);
                    apart.push(scenario(3, in_flight, latency, None).await);
                    alone.push(scenario(1, in_flight, latency, None).await);
                }
                println!(
                    "three replicas, keys 5/10 s, 5/10 s, unlimited, {REQUESTS} requests \
                     round-robin, {in_flight} in flight, provider latency {latency:?}, {RUNS} \
                     runs: upstream 429s {shared:?} with Redis, {apart:?} without, {alone:?} for \
                     one replica alone"
                );
            }
        }
    });
}
