//! The three-replica scenario of feature `redis`, shared by `tests/redis_scenarios.rs` and
//! `benches/shared_state.rs`: keys of 5 requests per 10 s, 5 per 10 s and unlimited, 60
//! requests spread round-robin over replicas (in-process layers, each with its own store,
//! over loopback HTTP to the fake provider), counting the upstream 429s.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_key_fallback::testing::{Behavior, FakeProvider, FakeServer};
use tower_key_fallback::{KeyEvent, KeyEvents, KeyFallback, KeyFallbackLayer, KeySet, RedisStore};

type HttpClient = Client<HttpConnector, Full<Bytes>>;
type Svc = KeyFallback<HttpClient>;

pub const KEYS: [&str; 3] = ["gsk_rep1", "gsk_rep2", "gsk_rep3"];
pub const REQUESTS: usize = 60;

/// No logs: the scenario's figures are what it prints.
struct Quiet;

impl KeyEvents for Quiet {
    fn on_event(&self, _: &KeyEvent<'_>) {}
}

async fn replica(redis: Option<(&str, &str)>) -> Svc {
    let mut builder = KeyFallbackLayer::builder(KeySet::new(KEYS).unwrap()).events(Quiet);
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

/// 60 requests round-robin over `replicas`, `in_flight` at a time, the provider answering
/// after `latency`, sharing through Redis at `(url, namespace)` if given: the upstream 429s.
/// Everything starts cold: new replicas, a new provider.
pub async fn scenario(
    replicas: usize,
    in_flight: usize,
    latency: Duration,
    redis: Option<(&str, &str)>,
) -> u64 {
    let limited = Behavior::RateLimited {
        requests: 5,
        window: Duration::from_secs(10),
    };
    let provider = FakeProvider::builder()
        .key(KEYS[0], limited.clone())
        .key(KEYS[1], limited)
        .key(KEYS[2], Behavior::Ok)
        .latency(latency)
        .build();
    let server = Arc::new(provider.serve_ephemeral().await.unwrap());
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
        let status = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("a request took over 30 s")
            .unwrap();
        assert_eq!(status, 200);
    }
    let total = provider.stats().total();
    total.rate_limited + total.quota_exhausted
}
