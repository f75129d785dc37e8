//! Half-open keys, waiting for a key and affinity, as a user sees them (the measured
//! scenarios of issue 10): requests over real loopback HTTP (hyper-util's client in the
//! layer, the fake provider served on 127.0.0.1), counting the upstream 401s and 429s the
//! pool spends. Each scenario prints its figures (`cargo test --test recovery_scenarios --
//! --nocapture`), with the same run without the feature, and asserts the issue's target.
//!
//! Real time is used: where the issue's windows are long (a 10 s window, a 30 s wait) they
//! are scaled down, as each scenario says in its comment and its printout. Every loop is
//! bounded in count and in time. `RECOVERY_DUMP=/tmp/dump` writes each recovery run's
//! events (key 2's attempts and answers left out) to `/tmp/dump.<requests>.<on|off>`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
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
    Affinity, KeyEvent, KeyEvents, KeyFallback, KeyFallbackBuilder, KeyFallbackLayer, KeyHandle,
    KeySet,
};

type HttpClient = Client<HttpConnector, Full<Bytes>>;
type Svc = KeyFallback<HttpClient>;

const CHAT: &str = "/openai/v1/chat/completions";

/// `n` keys `gsk_rec1`, `gsk_rec2`, … (labelled `key-1`, `key-2`, …).
fn keys(n: usize) -> KeySet {
    KeySet::new((1..=n).map(|i| format!("gsk_rec{i}"))).unwrap()
}

/// The layer over hyper-util's client, answering the layer's own 429 when no key can serve,
/// and telling `timeline` what it does.
fn layered(builder: KeyFallbackBuilder, timeline: &Timeline) -> (Svc, KeyHandle) {
    let layer = builder
        .exhausted_response(true)
        .events(timeline.clone())
        .build();
    let handle = layer.handle();
    let client = Client::builder(TokioExecutor::new()).build_http();
    (ServiceBuilder::new().layer(layer).service(client), handle)
}

/// A chat request; it names no bucket, so every limit is the key's.
fn chat(server: &FakeServer) -> Request<Full<Bytes>> {
    let body = r#"{"model":"llama-3.1-8b-instant","max_tokens":8,"messages":[{"role":"user","content":"Say hello in one word."}]}"#;
    Request::post(server.url(CHAT))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// What the layer did, in order, with when (ms since the timeline began).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Attempt(String),
    Answered(String, u16),
    Cooled(String, &'static str, Duration),
    Recovered(String),
    Probing(String),
    Opened(String),
}

#[derive(Clone)]
struct Timeline {
    start: Instant,
    events: Arc<Mutex<Vec<(u128, Ev)>>>,
}

impl Timeline {
    fn new() -> Timeline {
        Timeline {
            start: Instant::now(),
            events: Arc::default(),
        }
    }

    fn events(&self) -> Vec<(u128, Ev)> {
        self.events.lock().unwrap().clone()
    }

    /// The key of the last attempt started (for requests made one at a time).
    fn last_attempt(&self) -> Option<String> {
        let events = self.events.lock().unwrap();
        events.iter().rev().find_map(|(_, e)| match e {
            Ev::Attempt(key) => Some(key.clone()),
            _ => None,
        })
    }
}

impl KeyEvents for Timeline {
    fn on_event(&self, event: &KeyEvent<'_>) {
        let ev = match *event {
            KeyEvent::AttemptStarted { key, .. } => Ev::Attempt(key.to_owned()),
            KeyEvent::Answered { key, status, .. } => Ev::Answered(key.to_owned(), status),
            KeyEvent::CooledDown {
                key,
                reason,
                duration,
                ..
            } => Ev::Cooled(key.to_owned(), reason.as_str(), duration),
            KeyEvent::Recovered { key, .. } => Ev::Recovered(key.to_owned()),
            KeyEvent::Probing { key, .. } => Ev::Probing(key.to_owned()),
            KeyEvent::Opened { key, .. } => Ev::Opened(key.to_owned()),
            _ => return,
        };
        // The time is read under the lock, so the list is in time order.
        let mut events = self.events.lock().unwrap();
        events.push((self.start.elapsed().as_millis(), ev));
    }
}

/// One request, answered in full: its status and how long it took.
async fn send(svc: &Svc, req: Request<Full<Bytes>>) -> (u16, Duration) {
    let started = Instant::now();
    let mut svc = svc.clone();
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    let status = res.status().as_u16();
    res.into_body().collect().await.unwrap();
    (status, started.elapsed())
}

/// What a run of requests came to: answers by status (the layer's own 429s count as
/// refused) and the slowest answer.
#[derive(Debug, Default, Clone, Copy)]
struct Served {
    ok: usize,
    refused: usize,
    slowest: Duration,
}

impl Served {
    fn add(&mut self, (status, took): (u16, Duration)) {
        match status {
            200 => self.ok += 1,
            _ => self.refused += 1,
        }
        self.slowest = self.slowest.max(took);
    }
}

// ---------------------------------------------------------------------------------------
// 1. Recovery

/// Key 1 back in service: its first attempt after at least `GAP` without one.
#[derive(Debug, Clone, Copy)]
struct Reopening {
    /// When (ms into the run).
    at: u128,
    /// What had kept it out: the last cooldown told of it in the gap (`limit_reached`, a
    /// success that said the window was spent; `rate_limited`, a 429), or `budget` when no
    /// cooldown was told (the pool passed it over for its spent budget).
    after: &'static str,
    /// Upstream 429s it got from then until the next reopening.
    refused: u64,
}

/// A gap this long without an attempt on key 1 is a time out of service (the run keeps
/// 32 requests in flight, so a key in service gets an attempt every few milliseconds).
const GAP: u128 = 200;

/// What one recovery run came to.
#[derive(Debug)]
struct Recovery {
    reopenings: Vec<Reopening>,
    /// Upstream 429s on key 1 before it was first back in service: at the start, and
    /// answers to requests sent before its first time out.
    before: u64,
    /// All upstream 429s on key 1, as the provider counted them.
    total: u64,
    served: Served,
    requests: usize,
    took: Duration,
}

impl Recovery {
    /// Upstream 429s on key 1 at its recoveries (after its first time out began).
    fn at_recovery(&self) -> u64 {
        self.reopenings.iter().map(|r| r.refused).sum()
    }

    fn figures(&self) -> Vec<(u128, &'static str, u64)> {
        self.reopenings
            .iter()
            .map(|r| (r.at, r.after, r.refused))
            .collect()
    }
}

/// Key 1 serves `requests` per 2 s window but announces the window's end 1 s earlier than
/// it is; key 2 always serves; answers take 20 ms; 32 requests are kept in flight for
/// `RUN`.
const WINDOW: Duration = Duration::from_secs(2);
const UNDERSTATED: Duration = Duration::from_secs(1);
const RUN: Duration = Duration::from_millis(4200);

async fn recovery(requests: u32, probe_wait: Option<Duration>) -> Recovery {
    let started = Instant::now();
    let provider = FakeProvider::builder()
        .key(
            "gsk_rec1",
            Behavior::RateLimited {
                requests,
                window: WINDOW,
            },
        )
        .key("gsk_rec2", Behavior::Ok)
        .understate_retry_after(UNDERSTATED)
        .latency(Duration::from_millis(20))
        .build();
    let server = Arc::new(provider.serve_ephemeral().await.unwrap());
    let timeline = Timeline::new();
    let mut builder = KeyFallbackLayer::builder(keys(2));
    if let Some(wait) = probe_wait {
        builder = builder.probe_wait(wait);
    }
    let (svc, _handle) = layered(builder, &timeline);

    let end = Instant::now() + RUN;
    let sent = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (svc, server, sent) = (svc.clone(), server.clone(), sent.clone());
        workers.spawn(async move {
            let mut served = Served::default();
            // At most 20,000 requests in all, and none started after the run's end.
            while Instant::now() < end && sent.fetch_add(1, SeqCst) < 20_000 {
                served.add(send(&svc, chat(&server)).await);
            }
            served
        });
    }
    let mut served = Served::default();
    let deadline = tokio::time::Instant::now() + RUN + Duration::from_secs(20);
    while let Ok(Some(done)) = tokio::time::timeout_at(deadline, workers.join_next()).await {
        let s = done.unwrap();
        served.ok += s.ok;
        served.refused += s.refused;
        served.slowest = served.slowest.max(s.slowest);
    }
    assert!(workers.is_empty(), "every worker ended in time");

    let events = timeline.events();
    if let Ok(path) = std::env::var("RECOVERY_DUMP") {
        // The run's events but key 2's attempts and answers, for a closer look.
        let lines: Vec<String> = events
            .iter()
            .filter(|(_, e)| !matches!(e, Ev::Attempt(k) | Ev::Answered(k, _) if k == "key-2"))
            .map(|(t, e)| format!("{t} {e:?}"))
            .collect();
        let run = if probe_wait.is_some() { "off" } else { "on" };
        std::fs::write(format!("{path}.{requests}.{run}"), lines.join("\n")).unwrap();
    }
    // Key 1's times back in service, and what had kept it out.
    let mut reopenings: Vec<Reopening> = Vec::new();
    let mut last_attempt = None;
    let mut cooled = None;
    for (t, e) in &events {
        match e {
            Ev::Cooled(k, why, _) if k == "key-1" => cooled = Some(*why),
            Ev::Attempt(k) if k == "key-1" => {
                if last_attempt.is_some_and(|last| t - last >= GAP) {
                    reopenings.push(Reopening {
                        at: *t,
                        after: cooled.unwrap_or("budget"),
                        refused: 0,
                    });
                }
                last_attempt = Some(*t);
                cooled = None;
            }
            _ => {}
        }
    }
    // Each 429 on key 1 counts against the last reopening before it.
    let mut before = 0;
    for (t, e) in &events {
        if matches!(e, Ev::Answered(k, 429) if k == "key-1") {
            match reopenings.iter_mut().rev().find(|r| r.at <= *t) {
                Some(r) => r.refused += 1,
                None => before += 1,
            }
        }
    }
    // The timeline saw every 429 the provider counted on key 1.
    let total = provider.stats().key("gsk_rec1").rate_limited;
    let seen = events
        .iter()
        .filter(|(_, e)| matches!(e, Ev::Answered(k, 429) if k == "key-1"))
        .count() as u64;
    assert_eq!(seen, total, "the layer saw each 429 the provider sent");
    Recovery {
        reopenings,
        before,
        total,
        served,
        requests: sent.load(SeqCst).min(20_000),
        took: started.elapsed(),
    }
}

/// The issue's case, with key 1 serving `requests` per window: with probing, then with
/// `probe_wait(0)` (as the old code); prints both and asserts the target.
async fn recovery_scenario(requests: u32) {
    let probing = recovery(requests, None).await;
    let old = recovery(requests, Some(Duration::ZERO)).await;
    for (name, run) in [("probing", &probing), ("probe_wait(0)", &old)] {
        println!(
            "recovery, {name}: key 1 ({requests} per 2 s window, announced 1 s early) and \
             key 2, 32 in flight for {RUN:?}: upstream 429s on key 1 at its recoveries \
             {} (per recovery: ms, what kept it out, 429s: {:?}); {} before its first \
             recovery, {} in all; {} requests, {} served, {} refused, slowest {:?}; took {:?}",
            run.at_recovery(),
            run.figures(),
            run.before,
            run.total,
            run.requests,
            run.served.ok,
            run.served.refused,
            run.served.slowest,
            run.took,
        );
    }
    for run in [&probing, &old] {
        assert_eq!(run.served.refused, 0, "key 2 serves whatever key 1 cannot");
        assert!(
            run.reopenings.len() >= 2,
            "key 1 recovered at least twice: {run:?}"
        );
    }
    assert!(
        probing.reopenings.iter().all(|r| r.refused <= 1),
        "probing: at most one 429 per recovery: {:?}",
        probing.figures()
    );
    assert!(
        old.at_recovery() > probing.at_recovery(),
        "without probing the recoveries cost more: {} vs {}",
        old.at_recovery(),
        probing.at_recovery()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_out_of_a_cooldown_gets_one_429_at_recovery() {
    // The issue's case: a primary (priority order) recovers while its provider still
    // limits it for another second. Key 1 serves 20 requests per 2 s window, fewer than the
    // 32 in flight: the pool sends it its 20, the 20th answer says none is left (a
    // `limit_reached` cooldown until the announced reset), and it recovers out of that
    // cooldown about 1 s into each window, with a second still to run. The run lasts 4.2 s
    // to see it recover three times.
    recovery_scenario(20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_out_of_a_spent_budget_gets_one_429_at_recovery() {
    // The same with 50 requests per window, more than the 32 in flight: the pool counts the
    // requests in flight against the reported remaining and passes key 1 over before any
    // answer says none is left, so no cooldown is told; key 1 comes back when its budget's
    // (announced, early) reset passes.
    recovery_scenario(50).await;
}

// ---------------------------------------------------------------------------------------
// 2. Cold burst

/// 30 requests, 8 in flight, over keys [invalid, out of quota, good], answers in 50 ms:
/// upstream calls wasted (401s, 429s), what was served, and how long the burst took.
async fn cold_burst(probe_wait: Option<Duration>) -> ((u64, u64), Served, Duration) {
    let started = Instant::now();
    let provider = FakeProvider::builder()
        .key("gsk_rec1", Behavior::InvalidKey)
        .key("gsk_rec2", Behavior::QuotaExhausted)
        .key("gsk_rec3", Behavior::Ok)
        .latency(Duration::from_millis(50))
        .build();
    let server = Arc::new(provider.serve_ephemeral().await.unwrap());
    let timeline = Timeline::new();
    let mut builder = KeyFallbackLayer::builder(keys(3));
    if let Some(wait) = probe_wait {
        builder = builder.probe_wait(wait);
    }
    let (svc, _handle) = layered(builder, &timeline);
    let gate = Arc::new(Semaphore::new(8));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..30 {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let (svc, server) = (svc.clone(), server.clone());
        tasks.spawn(async move {
            let answer = send(&svc, chat(&server)).await;
            drop(permit);
            answer
        });
    }
    let mut served = Served::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(done)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {
        served.add(done.unwrap());
    }
    assert_eq!(
        served.ok + served.refused,
        30,
        "every request answered in time"
    );
    let total = provider.stats().total();
    let refused = total.rate_limited + total.quota_exhausted;
    ((total.unauthorized, refused), served, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_burst_spends_one_call_per_bad_key() {
    // The issue's figures as they are: 30 requests, 8 in flight, answers in 50 ms.
    let ((e401, e429), served, took) = cold_burst(None).await;
    let ((old401, old429), old_served, old_took) = cold_burst(Some(Duration::ZERO)).await;
    let (wasted, old_wasted) = (e401 + e429, old401 + old429);
    // What a request waits beyond the one 50 ms answer it needs.
    let added = |s: &Served| s.slowest.saturating_sub(Duration::from_millis(50));
    println!(
        "cold burst, keys [invalid, out of quota, good], 30 requests, 8 in flight, answers \
         in 50 ms: probing {wasted} wasted upstream calls ({e401} 401s + {e429} 429s), \
         {}/30 served, slowest {:?} (added {:?}), took {took:?}; probe_wait(0) \
         {old_wasted} wasted ({old401} + {old429}), {}/30 served, slowest {:?} (added {:?}), \
         took {old_took:?}",
        served.ok,
        served.slowest,
        added(&served),
        old_served.ok,
        old_served.slowest,
        added(&old_served),
    );
    assert_eq!(served.ok, 30, "{served:?}");
    assert!(wasted <= 3, "probing: {wasted} wasted calls");
    assert!(
        old_wasted > wasted,
        "without probing the burst wastes more: {old_wasted} vs {wasted}"
    );
}

// ---------------------------------------------------------------------------------------
// 3. Waiting

/// Three keys of 5 requests per `window`, 30 requests one after another.
async fn waiting(window: Duration, wait_for_key: Option<Duration>) -> (Served, u64, Duration) {
    let started = Instant::now();
    let limited = Behavior::RateLimited {
        requests: 5,
        window,
    };
    let provider = FakeProvider::builder()
        .key("gsk_rec1", limited.clone())
        .key("gsk_rec2", limited.clone())
        .key("gsk_rec3", limited)
        .latency(Duration::from_millis(20))
        .build();
    let server = provider.serve_ephemeral().await.unwrap();
    let timeline = Timeline::new();
    let mut builder = KeyFallbackLayer::builder(keys(3));
    if let Some(max) = wait_for_key {
        builder = builder.wait_for_key(max);
    }
    let (svc, _handle) = layered(builder, &timeline);
    let mut served = Served::default();
    for _ in 0..30 {
        let answer = tokio::time::timeout(Duration::from_secs(30), send(&svc, chat(&server)))
            .await
            .expect("each request answered in time");
        served.add(answer);
    }
    let upstream_429s = provider.stats().total().rate_limited;
    (served, upstream_429s, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_for_a_key_instead_of_failing() {
    // The issue's case is three keys of 5 requests per 10 s and `wait_for_key(30 s)`; on
    // real time that is about 50 s, so every duration is scaled down tenfold: 5 requests per
    // 1 s window, `wait_for_key(3 s)`.
    let window = Duration::from_secs(1);
    let max = Duration::from_secs(3);
    let (served, upstream, took) = waiting(window, Some(max)).await;
    let (old, old_upstream, old_took) = waiting(window, None).await;
    println!(
        "waiting (scaled tenfold: 5 per 1 s for 5 per 10 s, wait_for_key(3 s) for 30 s), \
         three keys, 30 requests one after another: wait_for_key {} served, {} refused, \
         {upstream} upstream 429s, slowest {:?}, took {took:?}; without it {} served, {} \
         refused (the layer's 429), {old_upstream} upstream 429s, took {old_took:?}",
        served.ok, served.refused, served.slowest, old.ok, old.refused,
    );
    assert_eq!(served.ok, 30, "{served:?}");
    assert_eq!(upstream, 0, "no upstream 429");
    assert!(old.refused > 0, "without waiting some fail: {old:?}");
}

// ---------------------------------------------------------------------------------------
// 4. Affinity

/// 1,000 requests one after another, over 100 affinity values: which keys served each
/// value.
async fn by_value(
    svc: &Svc,
    server: &FakeServer,
    timeline: &Timeline,
) -> BTreeMap<usize, BTreeSet<String>> {
    let mut keys: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    for i in 0..1000 {
        let value = i % 100;
        let mut req = chat(server);
        req.extensions_mut()
            .insert(Affinity::new(format!("conv-{value}")));
        let (status, _) = tokio::time::timeout(Duration::from_secs(10), send(svc, req))
            .await
            .expect("answered in time");
        assert_eq!(status, 200);
        let key = timeline.last_attempt().expect("an attempt was made");
        keys.entry(value).or_default().insert(key);
    }
    keys
}

/// How many values each key had.
fn per_key(keys: &BTreeMap<usize, String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for key in keys.values() {
        *counts.entry(key.clone()).or_insert(0) += 1;
    }
    counts
}

/// The one key each value went to.
fn one_key_each(keys: BTreeMap<usize, BTreeSet<String>>) -> BTreeMap<usize, String> {
    keys.into_iter()
        .map(|(value, keys)| {
            assert_eq!(keys.len(), 1, "value {value} went to {keys:?}");
            (value, keys.into_iter().next().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_value_keeps_its_key_and_losing_a_key_moves_only_its_values() {
    // The issue's figures as they are: 1,000 requests over 100 values and 4 keys, one at a
    // time (so the last attempt's key is the request's) and without added latency.
    let started = Instant::now();
    let provider = FakeProvider::builder()
        .key("gsk_rec1", Behavior::Ok)
        .key("gsk_rec2", Behavior::Ok)
        .key("gsk_rec3", Behavior::Ok)
        .key("gsk_rec4", Behavior::Ok)
        .build();
    let server = provider.serve_ephemeral().await.unwrap();
    let timeline = Timeline::new();
    let (svc, handle) = layered(KeyFallbackLayer::builder(keys(4)), &timeline);

    let before = one_key_each(by_value(&svc, &server, &timeline).await);
    let counts = per_key(&before);
    // The key with the most values goes.
    let gone = counts
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(k, _)| k.clone())
        .unwrap();
    handle.disable(&gone).unwrap();
    let after = one_key_each(by_value(&svc, &server, &timeline).await);
    let moved: Vec<usize> = (0..100).filter(|v| before[v] != after[v]).collect();
    let moved_from_others = moved.iter().filter(|v| before[v] != gone).count();
    println!(
        "affinity, 1,000 requests over 100 values and 4 keys: values per key {counts:?}; \
         {gone} disabled: values per key {:?}, {} values moved ({} of them from other \
         keys), took {:?}",
        per_key(&after),
        moved.len(),
        moved_from_others,
        started.elapsed(),
    );
    assert_eq!(counts.len(), 4, "every key has values: {counts:?}");
    assert_eq!(moved_from_others, 0, "only the disabled key's values moved");
    assert_eq!(
        moved.len(),
        counts[&gone],
        "all of the disabled key's values moved"
    );
    assert_eq!(provider.stats().total().served, 2000);
}
