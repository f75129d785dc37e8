//! Feature `redis`, as a user sees it: three replicas in front of one provider, over real
//! loopback HTTP (hyper-util's client in each layer, the fake provider on 127.0.0.1), with and
//! without a real `redis-server` between them, counting the upstream 429s the replicas spend.
//! Each run prints its figures (`cargo test --features redis --test redis_scenarios --
//! --nocapture`). Every loop is bounded in count and time.
#![cfg(feature = "redis")]

#[path = "support/redis.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use redis_server::RedisServer;
use tokio::sync::Semaphore;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_key_fallback::testing::{Behavior, FakeProvider, FakeServer};
use tower_key_fallback::{KeyFallback, KeyFallbackLayer, KeySet, RedisStore};

type HttpClient = Client<HttpConnector, Full<Bytes>>;
type Svc = KeyFallback<HttpClient>;

const KEYS: [&str; 3] = ["gsk_rep1", "gsk_rep2", "gsk_rep3"];
const REQUESTS: usize = 60;
const WAIT: Duration = Duration::from_secs(20);

/// Keys of 5 requests per 10 s, 5 per 10 s, and unlimited, answering after 50 ms (a fast
/// model's answer; `benches/shared_state.rs` also runs them answering at once).
async fn provider() -> (FakeProvider, FakeServer) {
    let limited = Behavior::RateLimited {
        requests: 5,
        window: Duration::from_secs(10),
    };
    let provider = FakeProvider::builder()
        .key(KEYS[0], limited.clone())
        .key(KEYS[1], limited)
        .key(KEYS[2], Behavior::Ok)
        .latency(Duration::from_millis(50))
        .build();
    let server = provider.serve_ephemeral().await.unwrap();
    (provider, server)
}

async fn replica(redis: Option<(&str, &str)>) -> Svc {
    let mut builder = KeyFallbackLayer::builder(KeySet::new(KEYS).unwrap());
    if let Some((url, namespace)) = redis {
        builder = builder.shared_state(RedisStore::connect(url, namespace).await.unwrap());
    }
    let client = Client::builder(TokioExecutor::new()).build_http();
    ServiceBuilder::new().layer(builder.build()).service(client)
}

async fn chat(mut svc: Svc, server: Arc<FakeServer>) -> u16 {
    let body = r#"{"model":"llama-3.1-8b-instant","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#;
    let req = Request::post(server.url("/openai/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    let status = res.status().as_u16();
    let _ = res.into_body().collect().await;
    status
}

/// 60 requests spread round-robin over `replicas`, `in_flight` at a time; the upstream 429s.
async fn run(replicas: usize, in_flight: usize, redis: Option<(&str, &str)>) -> u64 {
    let (provider, server) = provider().await;
    let server = Arc::new(server);
    let mut svcs = Vec::new();
    for _ in 0..replicas {
        svcs.push(replica(redis).await);
    }
    let gate = Arc::new(Semaphore::new(in_flight));
    let mut tasks = Vec::new();
    for i in 0..REQUESTS {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let (svc, server) = (svcs[i % replicas].clone(), server.clone());
        tasks.push(tokio::spawn(async move {
            let status = chat(svc, server).await;
            drop(permit);
            status
        }));
    }
    for task in tasks {
        let status = tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        assert_eq!(status, 200);
    }
    let total = provider.stats().total();
    total.rate_limited + total.quota_exhausted
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
