//! The cost of the key-fallback layer next to the least its job allows (issue 4).
//!
//! `cargo bench --bench overhead` measures, in one run:
//!
//! - `bare`: the upstream stand-in alone (a `service_fn` answering a small 200);
//! - `set_header`: tower-http's `SetRequestHeader` overriding `Authorization`;
//! - `limit`: `set_header` plus one copy of the request kept until the answer is in, the
//!   floor for a layer able to replay;
//! - `tower_retry`: tower's `Retry` around `set_header`, its policy copying the request and
//!   never retrying;
//! - `key_fallback/happy`, `key_fallback/one_429`, `key_fallback/keys_1000`: our layer;
//! - `key_fallback/happy_shared` (with `--features redis`): the happy path with key state
//!   shared through a real `redis-server` started on a free loopback port (whose work, and
//!   the store's task publishing each request's count, share the machine's cores with the
//!   bench); `key_fallback/happy_shared_redis_down`: the same with Redis down, what the
//!   request path itself pays;
//! - `contention/{bare,limit,key_fallback}/{1,2}`: 64 tasks on a tokio runtime with 1 and 2
//!   worker threads sending requests through clones of one service, as throughput;
//! - `keyset/{2000,20000}`: building a key set of that many keys (duplicate detection is
//!   linear: the ratio is about 10, a pairwise check would make it about 100).
//!
//! The single-threaded benchmarks drive each request synchronously (the services are always
//! ready and answer at once): every iteration is `poll_ready`, `call`, polling the future to
//! its answer and dropping the response. The request is built outside the timing (criterion's
//! `iter_batched`), always the same realistic one (`common::request`).
//!
//! `scripts/bench-table.py` turns the results into the ratios of the README.

use std::hint::black_box;

use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use http::{Response, StatusCode};
#[cfg(any(feature = "redis", feature = "metrics"))]
use tower::Layer;
use tower::Service;

mod common;
use common::*;

#[cfg(feature = "redis")]
#[path = "../tests/support/redis.rs"]
mod redis_server;

/// A `metrics` recorder whose counters, gauges and histograms are one shared atomic each
/// call adds to: the least a real recorder does.
#[cfg(feature = "metrics")]
mod counting {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};

    pub static TOTAL: AtomicU64 = AtomicU64::new(0);

    pub struct Recorder;
    struct Handle;

    impl metrics::CounterFn for Handle {
        fn increment(&self, n: u64) {
            TOTAL.fetch_add(n, Ordering::Relaxed);
        }
        fn absolute(&self, n: u64) {
            TOTAL.fetch_add(n, Ordering::Relaxed);
        }
    }
    impl metrics::GaugeFn for Handle {
        fn increment(&self, _: f64) {
            TOTAL.fetch_add(1, Ordering::Relaxed);
        }
        fn decrement(&self, _: f64) {
            TOTAL.fetch_add(1, Ordering::Relaxed);
        }
        fn set(&self, _: f64) {
            TOTAL.fetch_add(1, Ordering::Relaxed);
        }
    }
    impl metrics::HistogramFn for Handle {
        fn record(&self, _: f64) {
            TOTAL.fetch_add(1, Ordering::Relaxed);
        }
    }

    impl metrics::Recorder for Recorder {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(Arc::new(Handle))
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::from_arc(Arc::new(Handle))
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::from_arc(Arc::new(Handle))
        }
    }
}

/// Times `svc` on the usual request: build outside the timing, drive, drop the response.
fn bench_service<S, ResB>(b: &mut criterion::Bencher<'_>, svc: &mut S)
where
    S: Service<Req, Response = Response<ResB>>,
    S::Error: std::fmt::Debug,
{
    b.iter_batched(
        request,
        |req| drop(black_box(drive(svc, req))),
        // Small batches: 64 requests are built, then sent and dropped one by one. Large
        // batches (`SmallInput` builds thousands) leave the allocator freeing long runs of
        // adjacent chunks inside the timing (`malloc_consolidate`), which a client sending
        // requests as it builds them never does.
        BatchSize::NumIterations(64),
    );
}

/// `key_fallback/happy` with its key state shared through the Redis at `url`, the store's
/// task on `rt`.
#[cfg(feature = "redis")]
fn shared(
    rt: &tokio::runtime::Runtime,
    url: &str,
) -> tower_key_fallback::KeyFallback<
    impl tower::Service<Req, Response = Res, Error = std::convert::Infallible> + Clone,
> {
    let store = rt
        .block_on(tower_key_fallback::RedisStore::connect(url, "bench"))
        .unwrap();
    let mut svc = tower_key_fallback::KeyFallbackLayer::builder(
        tower_key_fallback::KeySet::new(KEYS).unwrap(),
    )
    .shared_state(store)
    .build()
    .layer(upstream(None));
    assert_eq!(drive(&mut svc, request()).status(), StatusCode::OK);
    svc
}

fn single(c: &mut Criterion) {
    c.bench_function("bare", |b| bench_service(b, &mut bare()));
    c.bench_function("set_header", |b| bench_service(b, &mut set_header()));
    c.bench_function("limit", |b| bench_service(b, &mut limit()));
    c.bench_function("tower_retry", |b| bench_service(b, &mut tower_retry()));

    let mut g = c.benchmark_group("key_fallback");

    let mut svc = key_fallback();
    let handle = svc.handle();
    assert_eq!(drive(&mut svc, request()).status(), StatusCode::OK);
    assert_eq!(handle.status().keys[0].successes, 1);
    g.bench_function("happy", |b| bench_service(b, &mut svc));

    // The same with key state shared through a real redis-server (feature `redis`): the
    // request path only hands what it learns to the store's task, which publishes it on a
    // runtime of its own.
    #[cfg(feature = "redis")]
    {
        let redis = redis_server::RedisServer::start();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut svc = shared(&rt, &redis.url());
        g.bench_function("happy_shared", |b| bench_service(b, &mut svc));
        drop((svc, redis));
        // With Redis down: what the request path itself pays (the store's task only drops
        // the window counts it is handed).
        let down = format!("redis://127.0.0.1:{}/", redis_server::free_port());
        let mut svc = shared(&rt, &down);
        g.bench_function("happy_shared_redis_down", |b| bench_service(b, &mut svc));
        drop((svc, rt));
    }

    // The same with the metrics observer beside the logs (feature `metrics`), into a
    // recorder whose counters are plain atomics: what the observer itself costs a request.
    #[cfg(feature = "metrics")]
    {
        let _ = ::metrics::set_global_recorder(counting::Recorder);
        let mut svc = tower_key_fallback::KeyFallbackLayer::builder(
            tower_key_fallback::KeySet::new(KEYS).unwrap(),
        )
        .events((
            tower_key_fallback::TracingEvents,
            tower_key_fallback::MetricsEvents::new(),
        ))
        .build()
        .layer(upstream(None));
        assert_eq!(drive(&mut svc, request()).status(), StatusCode::OK);
        let before = counting::TOTAL.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(drive(&mut svc, request()).status(), StatusCode::OK);
        assert!(counting::TOTAL.load(std::sync::atomic::Ordering::Relaxed) > before);
        g.bench_function("happy_metrics", |b| bench_service(b, &mut svc));
    }

    // Key 1 answers 429 (with `retry-after: 0`, see `common::groq_429`), key 2 answers 200.
    let mut svc = key_fallback_one_429();
    let handle = svc.handle();
    for round in 1..=2 {
        assert_eq!(drive(&mut svc, request()).status(), StatusCode::OK);
        let status = handle.status();
        assert_eq!(
            status.keys[0].rate_limited, round,
            "key 1 is limited every time"
        );
        assert_eq!(status.keys[1].successes, round, "key 2 serves every time");
    }
    g.bench_function("one_429", |b| bench_service(b, &mut svc));

    let mut svc = key_fallback_keys_1000();
    let handle = svc.handle();
    assert_eq!(drive(&mut svc, request()).status(), StatusCode::OK);
    assert_eq!(handle.status().keys[999].successes, 1);
    g.bench_function("keys_1000", |b| bench_service(b, &mut svc));

    g.finish();
}

fn contention(c: &mut Criterion) {
    let mut g = c.benchmark_group("contention");
    g.throughput(Throughput::Elements(contention::PER_ROUND));
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(20);
    for threads in [1usize, 2] {
        let rt = contention::runtime(threads);
        g.bench_function(BenchmarkId::new("bare", threads), |b| {
            contention::bench_rounds(b, &rt, &contention::shared(bare()))
        });
        g.bench_function(BenchmarkId::new("limit", threads), |b| {
            contention::bench_rounds(b, &rt, &contention::shared(limit()))
        });
        // Every task holds a clone of one service: one key pool for all.
        g.bench_function(BenchmarkId::new("key_fallback", threads), |b| {
            contention::bench_rounds(b, &rt, &contention::shared(key_fallback()))
        });
    }
    g.finish();
}

/// Building a key set: duplicates are found by digest in one lookup per key, so ten times the
/// keys cost about ten times as much (a pairwise check would cost a hundred times).
fn key_sets(c: &mut Criterion) {
    let mut g = c.benchmark_group("keyset");
    g.sample_size(10);
    for n in [2_000usize, 20_000] {
        let keys: Vec<String> = (0..n).map(|i| format!("gsk_{i:052}")).collect();
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| black_box(tower_key_fallback::KeySet::new(&keys).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(benches, single, contention, key_sets);
criterion_main!(benches);
