//! Budgets, buckets, declared limits and shared limits, as a user sees them: bursts of
//! requests with several in flight over real loopback HTTP (hyper-util's client in the layer,
//! the fake provider served on 127.0.0.1), counting the upstream 429s the pool spends
//! ("wasted calls"). Each scenario prints its figures (`cargo test --test capacity --
//! --nocapture`), with the same run without the feature where that makes sense.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_key_fallback::testing::{Behavior, FakeProvider, FakeServer};
use tower_key_fallback::{
    annotate_openai_json, KeyFallback, KeyFallbackBuilder, KeyFallbackLayer, KeyHandle, KeySet,
    Limits,
};

type HttpClient = Client<HttpConnector, Full<Bytes>>;
type Svc = KeyFallback<HttpClient>;

const CHAT: &str = "/openai/v1/chat/completions";

fn keys(n: usize) -> KeySet {
    KeySet::new((1..=n).map(|i| format!("gsk_cap{i}"))).unwrap()
}

fn layered(builder: KeyFallbackBuilder) -> (Svc, KeyHandle) {
    let layer = builder.exhausted_response(true).build();
    let handle = layer.handle();
    let client = Client::builder(TokioExecutor::new()).build_http();
    (ServiceBuilder::new().layer(layer).service(client), handle)
}

/// A chat request for `model`, with its bucket and token cost set from its body.
fn chat(server: &FakeServer, model: &str, max_tokens: u64) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"{model}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"Say hello in one word."}}]}}"#
    );
    let mut req = Request::post(server.url(CHAT))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    annotate_openai_json(&mut req, body.as_bytes());
    req
}

/// What a burst came to: answers by status (the layer's own 429s count as refused).
#[derive(Debug, Default, Clone, Copy)]
struct Burst {
    ok: usize,
    refused: usize,
}

/// `n` requests (made by `make`), `in_flight` at a time, each answered in full.
async fn burst(
    svc: &Svc,
    n: usize,
    in_flight: usize,
    make: impl Fn(usize) -> Request<Full<Bytes>>,
) -> Burst {
    let gate = Arc::new(Semaphore::new(in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let mut svc = svc.clone();
        let req = make(i);
        tasks.spawn(async move {
            let res = svc.ready().await.unwrap().call(req).await.unwrap();
            let status = res.status();
            res.into_body().collect().await.unwrap();
            drop(permit);
            status
        });
    }
    let mut out = Burst::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Ok(Some(status)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {
        match status.unwrap().as_u16() {
            200 => out.ok += 1,
            _ => out.refused += 1,
        }
    }
    assert_eq!(out.ok + out.refused, n, "every request answered in time");
    out
}

fn rate_limited(requests: u32, secs: u64) -> Behavior {
    Behavior::RateLimited {
        requests,
        window: Duration::from_secs(secs),
    }
}

/// Keys 5-per-10-s, 5-per-10-s and unlimited; 60 requests, 8 in flight, twice.
async fn two_limited_keys_and_a_good_one(
    hide_limits: bool,
    declare: bool,
) -> (u64, u64, Burst, Burst) {
    let mut provider = FakeProvider::builder()
        .key("gsk_cap1", rate_limited(5, 10))
        .key("gsk_cap2", rate_limited(5, 10))
        .key("gsk_cap3", Behavior::Ok)
        .latency(Duration::from_millis(30));
    if hide_limits {
        provider = provider.without_rate_limit_headers();
    }
    let provider = provider.build();
    let server = provider.serve_ephemeral().await.unwrap();
    let mut builder = KeyFallbackLayer::builder(keys(3));
    if declare {
        let five = Limits::new().requests(5, Duration::from_secs(10));
        builder = builder.key_limits("key-1", five).key_limits("key-2", five);
    }
    let (svc, _) = layered(builder);
    let first = burst(&svc, 60, 8, |_| chat(&server, "llama-3.1-8b-instant", 16)).await;
    let after_first = provider.stats().total().rate_limited;
    let second = burst(&svc, 60, 8, |_| chat(&server, "llama-3.1-8b-instant", 16)).await;
    let after_second = provider.stats().total().rate_limited - after_first;
    (after_first, after_second, first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_spend_no_call_on_a_key_the_provider_said_is_spent() {
    let (first, second, a, b) = two_limited_keys_and_a_good_one(false, false).await;
    let (declared_first, declared_second, c, d) =
        two_limited_keys_and_a_good_one(false, true).await;
    let (blind_first, blind_second, ..) = two_limited_keys_and_a_good_one(true, false).await;
    println!(
        "60 requests, 8 in flight, keys 5/10s, 5/10s, unlimited: wasted upstream calls \
         {first} (nothing declared), {declared_first} (limits declared), \
         {blind_first} (no rate-limit headers: learned from 429s only); \
         a second burst: {second}, {declared_second}, {blind_second}"
    );
    for run in [a, b, c, d] {
        assert_eq!(run.ok, 60, "{run:?}");
    }
    assert!(first <= 3, "first burst, nothing declared: {first} wasted");
    assert_eq!(second, 0, "second burst, after the reports");
    assert_eq!(declared_first, 0, "limits declared");
    assert_eq!(declared_second, 0, "limits declared, second burst");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_limited_on_one_model_keeps_serving_the_others() {
    // One key, 4 requests per minute per model; 15 requests for the busy model and 3 for
    // the quiet one, interleaved, 3 in flight.
    async fn run(buckets: bool) -> (usize, usize, Duration) {
        let provider = FakeProvider::builder()
            .key("gsk_cap1", rate_limited(4, 60))
            .per_model()
            .latency(Duration::from_millis(20))
            .build();
        let server = provider.serve_ephemeral().await.unwrap();
        let (svc, _) = layered(KeyFallbackLayer::builder(keys(1)));
        let quiet_ok = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let slowest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
        let mut tasks = tokio::task::JoinSet::new();
        let gate = Arc::new(Semaphore::new(3));
        for i in 0..18 {
            let permit = gate.clone().acquire_owned().await.unwrap();
            let quiet = i % 6 == 5;
            let mut req = chat(&server, if quiet { "quiet" } else { "busy" }, 8);
            if !buckets {
                req.extensions_mut().remove::<tower_key_fallback::Bucket>();
            }
            let (mut svc, quiet_ok, slowest) = (svc.clone(), quiet_ok.clone(), slowest.clone());
            tasks.spawn(async move {
                let started = Instant::now();
                let res = svc.ready().await.unwrap().call(req).await.unwrap();
                let ok = res.status() == 200;
                res.into_body().collect().await.unwrap();
                if quiet {
                    let mut s = slowest.lock().unwrap();
                    *s = (*s).max(started.elapsed());
                    if ok {
                        quiet_ok.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                drop(permit);
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        let slowest = *slowest.lock().unwrap();
        let wasted = provider.stats().total().rate_limited as usize;
        (
            quiet_ok.load(std::sync::atomic::Ordering::SeqCst),
            wasted,
            slowest,
        )
    }
    let (quiet_ok, wasted, slowest) = run(true).await;
    let (quiet_ok_without, wasted_without, _) = run(false).await;
    println!(
        "one key, two models, one limited: {quiet_ok}/3 requests for the other model served \
         (slowest {slowest:?}), {wasted} upstream 429s; without buckets {quiet_ok_without}/3 \
         served, {wasted_without} upstream 429s"
    );
    assert_eq!(quiet_ok, 3, "requests for the quiet model never fail");
    assert!(
        slowest < Duration::from_secs(2),
        "and never wait: {slowest:?}"
    );
    assert!(
        quiet_ok_without < 3,
        "the same run without buckets loses some"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_share_one_limit() {
    // Keys 1 and 2 share 5 requests per window (one organization), key 3 has its own; four
    // windows of 1.5 s, 16 requests each, 4 in flight.
    let window = Duration::from_millis(1500);
    async fn run(window: Duration, declare: bool) -> (Vec<u64>, Option<usize>) {
        let provider = FakeProvider::builder()
            .key(
                "gsk_cap1",
                Behavior::RateLimited {
                    requests: 5,
                    window,
                },
            )
            .shared_limit(["gsk_cap1", "gsk_cap2"])
            .key("gsk_cap3", Behavior::Ok)
            .latency(Duration::from_millis(20))
            .build();
        let server = provider.serve_ephemeral().await.unwrap();
        // Probing off: every key starts half-open, and which key's first answer comes back
        // first would decide where the first burst goes (probing is tested in
        // tests/recovery.rs).
        let mut builder = KeyFallbackLayer::builder(keys(3)).probe_wait(Duration::ZERO);
        if declare {
            builder = builder.group(["key-1", "key-2"]);
        }
        let (svc, handle) = layered(builder);
        let mut wasted = Vec::new();
        let mut noticed = None;
        let start = tokio::time::Instant::now();
        for w in 0..4u32 {
            tokio::time::sleep_until(start + window * w).await;
            let before = provider.stats().total().rate_limited;
            let run = burst(&svc, 16, 4, |_| chat(&server, "m", 8)).await;
            assert_eq!(run.ok, 16);
            wasted.push(provider.stats().total().rate_limited - before);
            let shared = handle.status().shared_limits;
            if noticed.is_none() && shared.iter().any(|s| s.keys == ["key-1", "key-2"]) {
                noticed = Some(w as usize + 1);
            }
        }
        (wasted, noticed)
    }
    let (declared, _) = run(window, true).await;
    let (undeclared, noticed) = run(window, false).await;
    println!(
        "keys 1 and 2 share 5 requests per window, key 3 its own: wasted calls per window \
         {declared:?} declared as a group, {undeclared:?} undeclared; the status named the \
         shared limit after window {noticed:?}"
    );
    assert!(declared.iter().all(|&w| w <= 1), "declared: {declared:?}");
    assert!(noticed.is_some_and(|w| w <= 2), "noticed after {noticed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_budget_passes_over_a_key_without_tokens_left() {
    // Key 1 has 1,000 tokens per 10 s, key 2 none to speak of; requests cost about 300.
    async fn run(costs: bool) -> (u64, u64) {
        let provider = FakeProvider::builder()
            .key(
                "gsk_cap1",
                Behavior::TokenLimited {
                    tokens: 1000,
                    window: Duration::from_secs(10),
                },
            )
            .key("gsk_cap2", Behavior::Ok)
            .latency(Duration::from_millis(20))
            .build();
        let server = provider.serve_ephemeral().await.unwrap();
        let (svc, _) = layered(KeyFallbackLayer::builder(keys(2)));
        let make = |_| {
            let mut req = chat(&server, "m", 270);
            if !costs {
                req.extensions_mut()
                    .remove::<tower_key_fallback::TokenCost>();
            }
            req
        };
        // One request first: its answer is the first report.
        assert_eq!(burst(&svc, 1, 1, make).await.ok, 1);
        let first = provider.stats().total().rate_limited;
        let run = burst(&svc, 20, 4, make).await;
        assert_eq!(run.ok, 20);
        (first, provider.stats().total().rate_limited - first)
    }
    let (before, after) = run(true).await;
    let (_, without) = run(false).await;
    println!(
        "token limit 1,000 per window, requests of ~300 tokens: {after} wasted after the \
         first report ({before} before it); without token costs {without}"
    );
    assert_eq!(after, 0);
}

/// Keys with limits of their own are never said to share one, however their requests are
/// reordered on the way: with 16 in flight over 16 connections, a request claimed later often
/// reaches the provider first, and its count must not read as another key's spending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_keys_are_never_said_to_share_a_limit() {
    let mut builder = FakeProvider::builder();
    for i in 1..=4 {
        builder = builder.key(format!("gsk_cap{i}"), Behavior::Ok);
    }
    let provider = builder.build();
    let server = provider.serve_ephemeral().await.unwrap();
    let (svc, handle) = layered(KeyFallbackLayer::builder(keys(4)));
    for _ in 0..10 {
        let run = burst(&svc, 1000, 16, |_| chat(&server, "m", 8)).await;
        assert_eq!(run.ok, 1000);
    }
    let status = handle.status();
    let requests: Vec<u64> = status.keys.iter().map(|k| k.requests).collect();
    println!("4 keys of their own, 10,000 requests, 16 in flight: {requests:?} per key");
    assert_eq!(status.shared_limits, [], "{requests:?}");
}

/// A declared limit is this process's guess, as the `None` branch of `spent_by_others` says:
/// a key whose provider window was partly spent before this process started (by an earlier
/// run) is not sharing a limit with another key when its first report comes in below the
/// declared count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_limit_above_the_first_report_is_no_shared_limit() {
    let limited = Behavior::RateLimited {
        requests: 100,
        window: Duration::from_secs(60),
    };
    let provider = FakeProvider::builder()
        .key("gsk_cap1", limited.clone())
        .key("gsk_cap2", limited)
        .build();
    let server = provider.serve_ephemeral().await.unwrap();
    // An earlier run of the gateway spent 40 of key 2's window.
    let (earlier, _) = layered(KeyFallbackLayer::builder(
        KeySet::new(["gsk_cap2".to_owned()]).unwrap(),
    ));
    assert_eq!(
        burst(&earlier, 40, 1, |_| chat(&server, "m", 8)).await.ok,
        40
    );
    let builder = KeyFallbackLayer::builder(keys(2))
        .limits(Limits::new().requests_per_minute(100))
        .round_robin()
        .probe_wait(Duration::ZERO);
    let (svc, handle) = layered(builder);
    assert_eq!(burst(&svc, 4, 1, |_| chat(&server, "m", 8)).await.ok, 4);
    let status = handle.status();
    let requests: Vec<u64> = status.keys.iter().map(|k| k.requests).collect();
    assert_eq!(status.shared_limits, [], "{requests:?}");
}
