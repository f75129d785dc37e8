//! Half-open probes, waiting for a key, backpressure and affinity, on tower-test mocks and a
//! paused clock: which requests reach the upstream, with which key, and when.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use support::*;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_key_fallback::{
    Affinity, Bucket, Exhausted, KeyFallback, KeyFallbackLayer, KeyHandle, KeySet, KeyState,
};

fn probing(keys: &KeyHandle, label: &str) -> Option<tower_key_fallback::Probing> {
    keys.status().get(label).unwrap().probing
}

#[tokio::test(start_paused = true)]
async fn a_key_out_of_its_cooldown_is_probed_by_one_request_and_a_failed_probe_backs_off() {
    let (mut svc, mut handle, keys) = service(KeyFallbackLayer::new(support::keys(2)));
    // Key 1 is limited for 5 s; key 2 serves (and is then known good).
    let call = spawn(&mut svc, request()).await;
    let (_, _, reply) = upstream(&mut handle).await;
    reply.send_response(limited("5"));
    let (bearer, _, reply) = upstream(&mut handle).await;
    assert_eq!(bearer, "Bearer gsk_key2");
    reply.send_response(ok());
    call.await.unwrap().unwrap();
    assert!(probing(&keys, "key-2").is_none(), "key 2 answered: open");

    tokio::time::advance(Duration::from_secs(5)).await;
    // Out of its cooldown, key 1 gets one request; the next two go to key 2 meanwhile.
    let probe = spawn(&mut svc, tagged("probe")).await;
    let (bearer, t, probe_reply) = upstream(&mut handle).await;
    assert_eq!((bearer.as_str(), t.as_str()), ("Bearer gsk_key1", "probe"));
    let p = probing(&keys, "key-1").expect("half-open");
    assert!(p.probe_in_flight);
    let mut others = Vec::new();
    for i in 0..2 {
        let call = spawn(&mut svc, tagged(&format!("other-{i}"))).await;
        let (bearer, _, reply) = upstream(&mut handle).await;
        assert_eq!(
            bearer, "Bearer gsk_key2",
            "a request in flight beside the probe"
        );
        others.push((call, reply));
    }
    // The provider still limits key 1: it waits twice its last cooldown, not the 1 s asked.
    probe_reply.send_response(limited("1"));
    let (bearer, _, reply) = upstream(&mut handle).await;
    assert_eq!(bearer, "Bearer gsk_key2", "the probe moves on to key 2");
    reply.send_response(ok());
    probe.await.unwrap().unwrap();
    assert_eq!(cooling(&keys, "key-1").0, Duration::from_secs(10));
    for (call, reply) in others {
        reply.send_response(ok());
        call.await.unwrap().unwrap();
    }

    // Ten seconds on, the next probe succeeds and opens key 1 to every request again.
    tokio::time::advance(Duration::from_secs(10)).await;
    serve(&mut svc, &mut handle, "gsk_key1", ok()).await;
    assert!(probing(&keys, "key-1").is_none());
    let a = spawn(&mut svc, request()).await;
    let b = spawn(&mut svc, request()).await;
    for _ in 0..2 {
        let (bearer, _, reply) = upstream(&mut handle).await;
        assert_eq!(bearer, "Bearer gsk_key1", "open: both in flight on key 1");
        reply.send_response(ok());
    }
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_backoff_of_failed_probes_stops_at_max_cooldown() {
    let layer = KeyFallbackLayer::builder(support::keys(1))
        .max_cooldown(Duration::from_secs(25))
        .build();
    let (mut svc, mut handle, keys) = service(layer);
    let mut last = Duration::from_secs(0);
    // 10 s, then 20, then 25 (twice 20, capped), then 25 again.
    for want in [10, 20, 25, 25] {
        tokio::time::advance(last).await;
        let call = spawn(&mut svc, request()).await;
        let (_, _, reply) = upstream(&mut handle).await;
        reply.send_response(limited("10"));
        assert!(call.await.unwrap().is_err());
        last = cooling(&keys, "key-1").0;
        assert_eq!(last, Duration::from_secs(want));
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_gives_the_probe_back() {
    let (mut svc, mut handle, keys) = service(KeyFallbackLayer::new(support::keys(1)));
    let call = spawn(&mut svc, tagged("dropped")).await;
    let (_, t, reply) = upstream(&mut handle).await;
    assert_eq!(t, "dropped");
    assert!(probing(&keys, "key-1").unwrap().probe_in_flight);
    call.abort();
    let _ = call.await;
    drop(reply);
    let p = probing(&keys, "key-1").expect("still not heard from");
    assert!(
        !p.probe_in_flight,
        "the dropped request's probe was given back"
    );
    // The next request probes at once: no wait for a probe that will never answer.
    let start = Instant::now();
    serve(&mut svc, &mut handle, "gsk_key1", ok()).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_cold_burst_probes_each_key_once_and_the_rest_wait_for_the_first_good_answer() {
    let (mut svc, mut handle, keys) = service(KeyFallbackLayer::new(support::keys(3)));
    let mut calls = Vec::new();
    for i in 0..6 {
        calls.push(spawn(&mut svc, tagged(&format!("r{i}"))).await);
    }
    // One probe per key, in priority order; the other three wait.
    let mut probes = Vec::new();
    for want in ["gsk_key1", "gsk_key2", "gsk_key3"] {
        let (bearer, _, reply) = upstream(&mut handle).await;
        assert_eq!(bearer, format!("Bearer {want}"));
        probes.push(reply);
    }
    no_upstream_call(&mut handle).await;
    assert_eq!(keys.status().waiting, 3);
    // Key 1 is invalid, key 2 out of quota, key 3 good.
    let mut probes = probes.into_iter();
    probes
        .next()
        .unwrap()
        .send_response(response(401, &[], INVALID_401));
    probes
        .next()
        .unwrap()
        .send_response(response(429, &[], QUOTA_429));
    no_upstream_call(&mut handle).await;
    probes.next().unwrap().send_response(ok());
    // The two refused requests and the three waiting go to key 3: two wasted calls in all.
    for _ in 0..5 {
        let (bearer, _, reply) = upstream(&mut handle).await;
        assert_eq!(bearer, "Bearer gsk_key3");
        reply.send_response(ok());
    }
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(keys.status().waiting, 0);
    assert!(matches!(state(&keys, "key-1"), KeyState::Disabled { .. }));
    assert!(matches!(
        state(&keys, "key-2"),
        KeyState::CoolingDown { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn no_request_waits_for_a_probe_while_a_known_good_key_can_serve() {
    let (mut svc, mut handle, keys) = service(KeyFallbackLayer::new(support::keys(2)));
    // Key 2 is known good; key 1 was reset, so it is not heard from.
    keys.disable("key-1").unwrap();
    serve(&mut svc, &mut handle, "gsk_key2", ok()).await;
    keys.reset("key-1").unwrap();
    let probe = spawn(&mut svc, tagged("probe")).await;
    let (bearer, _, probe_reply) = upstream(&mut handle).await;
    assert_eq!(bearer, "Bearer gsk_key1");
    // While the probe is out, a request goes to key 2 at once.
    let start = Instant::now();
    let other = spawn(&mut svc, tagged("other")).await;
    let (bearer, t, reply) = upstream(&mut handle).await;
    assert_eq!((bearer.as_str(), t.as_str()), ("Bearer gsk_key2", "other"));
    assert_eq!(start.elapsed(), Duration::ZERO);
    reply.send_response(ok());
    other.await.unwrap().unwrap();
    probe_reply.send_response(ok());
    probe.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_has_not_answered_within_the_probe_wait_lets_the_others_in() {
    let layer = KeyFallbackLayer::builder(support::keys(1))
        .probe_wait(Duration::from_millis(300))
        .build();
    let (mut svc, mut handle, _keys) = service(layer);
    let slow = spawn(&mut svc, tagged("slow")).await;
    let (_, _, slow_reply) = upstream(&mut handle).await;
    let start = Instant::now();
    let waiting = spawn(&mut svc, tagged("waiting")).await;
    let (_, t, reply) = upstream(&mut handle).await;
    assert_eq!(t, "waiting");
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    reply.send_response(ok());
    waiting.await.unwrap().unwrap();
    slow_reply.send_response(ok());
    slow.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn probe_wait_zero_sends_a_cold_burst_as_before() {
    let layer = KeyFallbackLayer::builder(support::keys(2))
        .probe_wait(Duration::ZERO)
        .build();
    let (mut svc, mut handle, _keys) = service(layer);
    let a = spawn(&mut svc, request()).await;
    let b = spawn(&mut svc, request()).await;
    for _ in 0..2 {
        let (bearer, _, reply) = upstream(&mut handle).await;
        assert_eq!(bearer, "Bearer gsk_key1");
        reply.send_response(ok());
    }
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
}

/// A pool of one key, heard from, then limited for `secs` seconds.
async fn one_key_limited(
    wait: Option<Duration>,
    secs: &str,
) -> (KeyFallback<Mock>, MockHandle, KeyHandle) {
    let mut builder = KeyFallbackLayer::builder(support::keys(1));
    if let Some(max) = wait {
        builder = builder.wait_for_key(max);
    }
    let (mut svc, mut handle, keys) = service(builder.build());
    serve(&mut svc, &mut handle, "gsk_key1", ok()).await;
    let call = spawn(&mut svc, request()).await;
    let (_, _, reply) = upstream(&mut handle).await;
    reply.send_response(limited(secs));
    assert!(call.await.unwrap().is_err());
    (svc, handle, keys)
}

#[tokio::test(start_paused = true)]
async fn waiters_get_the_key_in_turn_when_it_comes_back() {
    let wait = Some(Duration::from_secs(30));
    let (svc, mut handle, keys) = one_key_limited(wait, "10").await;
    let start = Instant::now();
    // poll_ready is pending while no key can serve: these calls skip it, as a caller that
    // raced with the cooldown would.
    let mut calls = Vec::new();
    for i in 0..3 {
        let mut svc = svc.clone();
        calls.push(tokio::spawn(async move {
            svc.call(tagged(&format!("w{i}"))).await
        }));
        tokio::task::yield_now().await;
    }
    no_upstream_call(&mut handle).await;
    assert_eq!(keys.status().waiting, 3);
    // At the key's return the first waiter probes it; on its success the others follow,
    // first come, first served.
    let (_, t, reply) = upstream(&mut handle).await;
    assert_eq!(t, "w0");
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    reply.send_response(ok());
    for want in ["w1", "w2"] {
        let (_, t, reply) = upstream(&mut handle).await;
        assert_eq!(t, want);
        reply.send_response(ok());
    }
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(keys.status().waiting, 0);
}

#[tokio::test(start_paused = true)]
async fn without_wait_for_key_a_request_fails_at_once_as_before() {
    let (mut svc, _handle, _keys) = one_key_limited(None, "10").await;
    let start = Instant::now();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request())
        .await
        .unwrap_err();
    let exhausted = err.downcast::<Exhausted>().unwrap();
    assert_eq!(exhausted.retry_after(), Some(Duration::from_secs(10)));
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_key_further_off_than_the_wait_or_none_at_all_fails_at_once() {
    let wait = Some(Duration::from_secs(30));
    let (mut svc, _handle, keys) = one_key_limited(wait, "60").await;
    let start = Instant::now();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request())
        .await
        .unwrap_err();
    assert!(err.is::<Exhausted>());
    keys.disable("key-1").unwrap();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request())
        .await
        .unwrap_err();
    assert_eq!(err.downcast::<Exhausted>().unwrap().retry_after(), None);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_dropped_leaves_the_queue_and_a_reset_wakes_the_rest() {
    let wait = Some(Duration::from_secs(30));
    let (svc, mut handle, keys) = one_key_limited(wait, "20").await;
    let mut first = svc.clone();
    let first = tokio::spawn(async move { first.call(tagged("dropped")).await });
    tokio::task::yield_now().await;
    let mut second = svc.clone();
    let second = tokio::spawn(async move { second.call(tagged("kept")).await });
    tokio::task::yield_now().await;
    assert_eq!(keys.status().waiting, 2);
    first.abort();
    let _ = first.await;
    assert_eq!(keys.status().waiting, 1);
    // A reset makes the key usable before its cooldown ends: the waiter goes at once.
    tokio::time::advance(Duration::from_secs(2)).await;
    keys.reset_all();
    let (_, t, reply) = upstream(&mut handle).await;
    assert_eq!(t, "kept");
    reply.send_response(ok());
    assert_eq!(second.await.unwrap().unwrap().status(), 200);
    assert_eq!(keys.status().waiting, 0);
}

#[tokio::test(start_paused = true)]
async fn not_ready_while_no_key_can_serve_so_load_shed_sheds() {
    let wait = Some(Duration::from_secs(30));
    let (svc, mut handle, _keys) = one_key_limited(wait, "10").await;
    let mut shed = ServiceBuilder::new().load_shed().service(svc.clone());
    let shed_call = shed.ready().await.unwrap().call(request());
    let err = tokio::time::timeout(Duration::from_secs(60), shed_call)
        .await
        .expect("shed at once, not sent to wait for the key")
        .unwrap_err();
    assert!(
        err.is::<tower::load_shed::error::Overloaded>(),
        "shed while no key can serve: {err}"
    );
    // A caller that waits for readiness is woken when the key is back.
    let start = Instant::now();
    let mut svc = svc;
    svc.ready().await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    let call = tokio::spawn(shed.ready().await.unwrap().call(request()));
    let (_, _, reply) = upstream(&mut handle).await;
    reply.send_response(ok());
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn a_timeout_bounds_a_wait_and_the_waiter_leaves_the_queue() {
    // Key 1 is limited in bucket "m" only: the service is ready (requests naming no bucket
    // can go), and a request for "m" waits in its future, which the timeout bounds.
    let layer = KeyFallbackLayer::builder(support::keys(1))
        .wait_for_key(Duration::from_secs(30))
        .build();
    let (svc, mut handle, keys) = service(layer);
    let in_m = || {
        let mut req = request();
        req.extensions_mut().insert(Bucket::new("m"));
        req
    };
    let mut plain = svc.clone();
    serve(&mut plain, &mut handle, "gsk_key1", ok()).await;
    let call = spawn(&mut plain, in_m()).await;
    let (_, _, reply) = upstream(&mut handle).await;
    reply.send_response(limited("10"));
    assert!(call.await.unwrap().is_err());

    let mut timed = ServiceBuilder::new()
        .timeout(Duration::from_secs(2))
        .service(svc);
    let start = Instant::now();
    let err = timed.ready().await.unwrap().call(in_m()).await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(
        keys.status().waiting,
        0,
        "the timed-out waiter left the queue"
    );
    // Under a longer timeout the request waits for the bucket and is served.
    let mut timed = ServiceBuilder::new()
        .timeout(Duration::from_secs(20))
        .service(timed.into_inner());
    let call = tokio::spawn(timed.ready().await.unwrap().call(in_m()));
    let (_, _, reply) = upstream(&mut handle).await;
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    reply.send_response(ok());
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
}

/// The key each of `values` lands on, one request at a time.
async fn landings(
    svc: &mut KeyFallback<Mock>,
    handle: &mut MockHandle,
    values: &[String],
) -> Vec<String> {
    let mut out = Vec::new();
    for v in values {
        let mut req = request();
        req.extensions_mut().insert(Affinity::new(v));
        let call = spawn(svc, req).await;
        let (bearer, _, reply) = upstream(handle).await;
        reply.send_response(ok());
        call.await.unwrap().unwrap();
        out.push(bearer);
    }
    out
}

#[tokio::test(start_paused = true)]
async fn affinity_keeps_a_value_on_one_key_and_losing_a_key_moves_only_its_values() {
    let (mut svc, mut handle, keys) = service(KeyFallbackLayer::new(support::keys(4)));
    // A cold burst of four probes each key once: all are heard from, and open.
    let mut calls = Vec::new();
    for _ in 0..4 {
        calls.push(spawn(&mut svc, request()).await);
    }
    for _ in 0..4 {
        let (_, _, reply) = upstream(&mut handle).await;
        reply.send_response(ok());
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert!(keys.status().keys.iter().all(|k| k.probing.is_none()));
    let values: Vec<String> = (0..20).map(|i| format!("conversation-{i}")).collect();
    let first = landings(&mut svc, &mut handle, &values).await;
    let again = landings(&mut svc, &mut handle, &values).await;
    assert_eq!(first, again, "each value lands on one key");
    let used: std::collections::BTreeSet<_> = first.iter().collect();
    assert!(used.len() >= 3, "values spread over the keys: {used:?}");
    // Without the extension nothing changes: priority order.
    serve(&mut svc, &mut handle, "gsk_key1", ok()).await;
    // Key 3 lost: only its values move.
    keys.disable("key-3").unwrap();
    let after = landings(&mut svc, &mut handle, &values).await;
    for (before, now) in first.iter().zip(&after) {
        if before != "Bearer gsk_key3" {
            assert_eq!(before, now, "a value of another key moved");
        } else {
            assert_ne!(now, "Bearer gsk_key3");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_cold_key_ranked_first_for_an_affinity_is_probed_once() {
    // Affinity on keys not heard from: the first request probes the value's key; a second
    // with the same value meanwhile uses another key rather than wait.
    let (mut svc, mut handle, _keys) = service(KeyFallbackLayer::new(support::keys(2)));
    let with = |v: &str| {
        let mut req = request();
        req.extensions_mut().insert(Affinity::new(v));
        req
    };
    let a = spawn(&mut svc, with("same")).await;
    let (first, _, ra) = upstream(&mut handle).await;
    let b = spawn(&mut svc, with("same")).await;
    let (second, _, rb) = upstream(&mut handle).await;
    assert_ne!(first, second, "the second went to the other key's probe");
    ra.send_response(ok());
    rb.send_response(ok());
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
}

fn reports(remaining: u64, reset: &str) -> Res {
    let remaining = remaining.to_string();
    response(
        200,
        &[
            ("x-ratelimit-limit-requests", "5"),
            ("x-ratelimit-remaining-requests", &remaining),
            ("x-ratelimit-reset-requests", reset),
        ],
        "{}",
    )
}

#[tokio::test(start_paused = true)]
async fn the_end_of_a_window_the_count_said_was_spent_is_probed_by_one_request() {
    let (mut svc, mut handle, _keys) = service(KeyFallbackLayer::new(support::keys(2)));
    serve(&mut svc, &mut handle, "gsk_key1", reports(2, "10s")).await;
    // Two in flight take key 1's last two; a third goes to key 2.
    let mut open = Vec::new();
    for want in ["gsk_key1", "gsk_key1", "gsk_key2"] {
        let call = spawn(&mut svc, request()).await;
        let (bearer, _, reply) = upstream(&mut handle).await;
        assert_eq!(bearer, format!("Bearer {want}"));
        open.push((call, reply));
    }
    let (call, reply) = open.pop().unwrap();
    reply.send_response(ok());
    call.await.unwrap().unwrap();
    // The window ends with two still in flight: one request probes key 1, the next goes to
    // key 2 rather than follow it (the limit of 5 would let it).
    tokio::time::advance(Duration::from_secs(10)).await;
    for want in ["gsk_key1", "gsk_key2"] {
        let call = spawn(&mut svc, request()).await;
        let (bearer, _, reply) = upstream(&mut handle).await;
        assert_eq!(bearer, format!("Bearer {want}"));
        open.push((call, reply));
    }
    for (call, reply) in open {
        reply.send_response(ok());
        call.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_report_that_resets_now_holds_for_a_moment() {
    let (mut svc, mut handle, _keys) = service(KeyFallbackLayer::new(support::keys(2)));
    // "1 left, resets in 0s": the window has not quite ended (a reset rounded down).
    serve(&mut svc, &mut handle, "gsk_key1", reports(1, "0s")).await;
    let mut open = Vec::new();
    for want in ["gsk_key1", "gsk_key2"] {
        let call = spawn(&mut svc, request()).await;
        let (bearer, _, reply) = upstream(&mut handle).await;
        assert_eq!(bearer, format!("Bearer {want}"));
        open.push((call, reply));
    }
    for (call, reply) in open {
        reply.send_response(ok());
        call.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_request_waits_for_the_next_key_instead_of_failing() {
    let layer = KeyFallbackLayer::builder(support::keys(2))
        .wait_for_key(Duration::from_secs(30))
        .build();
    let (mut svc, mut handle, keys) = service(layer);
    keys.cool_down("key-2", Duration::from_secs(5)).unwrap();
    let start = Instant::now();
    let call = spawn(&mut svc, request()).await;
    let (bearer, _, reply) = upstream(&mut handle).await;
    assert_eq!(bearer, "Bearer gsk_key1");
    reply.send_response(limited("60"));
    // Key 2 comes back in 5 s: the replay waits for it (a copy of the request was kept).
    let (bearer, _, reply) = upstream(&mut handle).await;
    assert_eq!(bearer, "Bearer gsk_key2");
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    reply.send_response(ok());
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
}

#[test]
fn the_service_stays_send_and_sync_and_its_future_send() {
    // The service keeps its readiness wake-up (with `wait_for_key`); the future its wait.
    fn both<T: Send + Sync>() {}
    fn send<T: Send>() {}
    both::<KeyFallback<Mock>>();
    both::<KeyFallbackLayer>();
    send::<tower_key_fallback::ResponseFuture<Mock, Full<Bytes>>>();
}

// The issue's measured scenarios at their own sizes, on the in-process fake provider and a
// paused clock (tests/recovery_scenarios.rs runs them over loopback HTTP, scaled down).

fn chat_request() -> Req {
    http::Request::post("http://fake.invalid/openai/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"llama-3.1-8b-instant","messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap()
}

async fn sequential_over_three_limited_keys(wait: Option<Duration>) -> (usize, u64) {
    use tower_key_fallback::testing::{Behavior, FakeProvider};
    let limited = Behavior::RateLimited {
        requests: 5,
        window: Duration::from_secs(10),
    };
    let provider = FakeProvider::builder()
        .key("gsk_w1", limited.clone())
        .key("gsk_w2", limited.clone())
        .key("gsk_w3", limited)
        .build();
    let mut builder =
        KeyFallbackLayer::builder(KeySet::new(["gsk_w1", "gsk_w2", "gsk_w3"]).unwrap());
    if let Some(max) = wait {
        builder = builder.wait_for_key(max);
    }
    let mut svc: KeyFallback<FakeProvider> =
        tower::Layer::layer(&builder.build(), provider.clone());
    let mut served = 0;
    for _ in 0..30 {
        let res = ServiceExt::<Req>::ready(&mut svc)
            .await
            .unwrap()
            .call(chat_request())
            .await;
        if res.is_ok_and(|r| r.status() == 200) {
            served += 1;
        }
    }
    (served, provider.stats().total().rate_limited)
}

#[tokio::test(start_paused = true)]
async fn three_keys_five_per_ten_seconds_thirty_requests_all_served_with_wait_for_key() {
    let start = Instant::now();
    let (served, refused) = sequential_over_three_limited_keys(Some(Duration::from_secs(30))).await;
    let waited = start.elapsed();
    let (served_before, refused_before) = sequential_over_three_limited_keys(None).await;
    println!(
        "three keys 5 per 10 s, 30 sequential requests: wait_for_key(30 s) {served} served, \
         {refused} upstream 429s, {waited:?} on the paused clock; without it {served_before} \
         served, {refused_before} upstream 429s"
    );
    assert_eq!((served, refused), (30, 0));
    assert_eq!(served_before, 15, "without the option: today's behaviour");
}

#[tokio::test(start_paused = true)]
async fn a_cold_burst_over_an_invalid_a_spent_and_a_good_key_wastes_at_most_three_calls() {
    use tower_key_fallback::testing::{Behavior, FakeProvider};
    async fn run(probe_wait: Duration) -> (u64, usize) {
        let provider = FakeProvider::builder()
            .key("gsk_bad", Behavior::InvalidKey)
            .key("gsk_spent", Behavior::QuotaExhausted)
            .key("gsk_good", Behavior::Ok)
            .latency(Duration::from_millis(50))
            .build();
        let layer =
            KeyFallbackLayer::builder(KeySet::new(["gsk_bad", "gsk_spent", "gsk_good"]).unwrap())
                .probe_wait(probe_wait)
                .build();
        let svc: KeyFallback<FakeProvider> = tower::Layer::layer(&layer, provider.clone());
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..30 {
            let permit = gate.clone().acquire_owned().await.unwrap();
            let svc = svc.clone();
            calls.spawn(async move {
                let res = ServiceExt::<Req>::oneshot(svc, chat_request()).await;
                drop(permit);
                res.is_ok_and(|r| r.status() == 200)
            });
        }
        let mut served = 0;
        while let Some(ok) = calls.join_next().await {
            served += usize::from(ok.unwrap());
        }
        let total = provider.stats().total();
        (total.requests - total.served, served)
    }
    let (wasted, served) = run(Duration::from_secs(1)).await;
    let (wasted_before, _) = run(Duration::ZERO).await;
    println!(
        "cold burst, 30 requests 8 in flight over invalid, spent and good keys, 50 ms answers: \
         {wasted} wasted upstream calls, {served} served; without probes {wasted_before}"
    );
    assert_eq!(served, 30);
    assert!(wasted <= 3, "{wasted} wasted");
    assert!(wasted_before > wasted, "the scenario shows the difference");
}

#[tokio::test(start_paused = true)]
async fn thirty_two_in_flight_meet_a_primary_that_recovers_too_early_with_one_probe() {
    use tower_key_fallback::testing::{Behavior, FakeProvider};
    async fn run(probe_wait: Duration) -> (u64, u64, usize) {
        let provider = FakeProvider::builder()
            .key(
                "gsk_primary",
                Behavior::RateLimited {
                    requests: 20,
                    window: Duration::from_secs(2),
                },
            )
            .key("gsk_spare", Behavior::Ok)
            .understate_retry_after(Duration::from_secs(1))
            .latency(Duration::from_millis(20))
            .build();
        let layer = KeyFallbackLayer::builder(KeySet::new(["gsk_primary", "gsk_spare"]).unwrap())
            .probe_wait(probe_wait)
            .build();
        let svc: KeyFallback<FakeProvider> = tower::Layer::layer(&layer, provider.clone());
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
        let start = Instant::now();
        let mut calls = tokio::task::JoinSet::new();
        let mut sent = 0;
        while start.elapsed() < Duration::from_millis(4200) && sent < 20_000 {
            let permit = gate.clone().acquire_owned().await.unwrap();
            let svc = svc.clone();
            sent += 1;
            calls.spawn(async move {
                let res = ServiceExt::<Req>::oneshot(svc, chat_request()).await;
                drop(permit);
                res.is_ok_and(|r| r.status() == 200)
            });
        }
        let mut served = 0;
        while let Some(ok) = calls.join_next().await {
            served += usize::from(ok.unwrap());
        }
        assert_eq!(served, sent, "every request served");
        let primary = provider.stats().key("gsk_primary");
        (primary.rate_limited, primary.served, served)
    }
    let (refused, primary_served, served) = run(Duration::from_secs(1)).await;
    let (refused_before, _, _) = run(Duration::ZERO).await;
    println!(
        "32 in flight for 4.2 s, primary 20 per 2 s announcing its reset 1 s early: {refused} \
         upstream 429s on the primary with probes ({primary_served} served by it, {served} in \
         all); {refused_before} without"
    );
    // Two windows end in the run: at most one refusal at each.
    assert!(refused <= 2, "{refused} 429s");
    assert!(
        refused_before > 10 * refused.max(1),
        "{refused_before} without probes"
    );
}
