//! Review of issue 10 (half-open probes, bounded waiting, backpressure, affinity): each test
//! shows one defect found in review and fails until it is fixed. Mocks and a paused clock,
//! in the style of tests/recovery.rs.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_key_fallback::{
    BoxError, Bucket, CooldownReason, Exhausted, KeyFallback, KeyFallbackLayer, KeyHandle,
    TokenCost,
};

fn in_bucket(tag: &str, bucket: &str) -> Req {
    let mut req = tagged(tag);
    req.extensions_mut().insert(Bucket::new(bucket));
    req
}

fn costing(tag: &str, cost: u64) -> Req {
    let mut req = tagged(tag);
    req.extensions_mut().insert(TokenCost(cost));
    req
}

/// A call that skips `poll_ready` (pending while no key can serve), as a caller that raced
/// with a cooldown would; yields so that it starts (and queues) before the next one.
async fn spawn_unready(svc: &KeyFallback<Mock>, req: Req) -> Call {
    let mut svc = svc.clone();
    let call = tokio::spawn(async move { svc.call(req).await });
    tokio::task::yield_now().await;
    call
}

/// A request that `key` refuses with `res`, and that fails (no other key).
async fn refused(svc: &mut KeyFallback<Mock>, handle: &mut MockHandle, req: Req, res: Res) {
    let call = spawn(svc, req).await;
    let (_, _, reply) = upstream(handle).await;
    reply.send_response(res);
    assert!(call.await.unwrap().is_err());
}

fn probe_in_flight(keys: &KeyHandle, label: &str) -> bool {
    keys.status()
        .get(label)
        .unwrap()
        .probing
        .is_some_and(|p| p.probe_in_flight)
}

// ---------------------------------------------------------------------------------------
// 1. A fault that leaves its key usable (a 5xx) is replayed on that very key.
// ---------------------------------------------------------------------------------------

/// Key 1 is open and key 2 half-open with its probe out. A request on key 1 gets a 500: it
/// should wait for key 2's probe (or give up), not be sent to key 1 again at once. Both
/// ways out of `Driver::advance` restart the scan from scratch: `rescan` ("a key can serve
/// now": key 1 itself, still active after one 500), and without it the wait's first
/// `after_wait`, which scans every key before waiting for anything.
#[tokio::test(start_paused = true)]
async fn a_server_error_is_not_replayed_on_the_key_that_just_failed() {
    let layer = KeyFallbackLayer::builder(support::keys(2))
        .probe_wait(Duration::from_secs(10))
        .build();
    let (mut svc, mut handle, keys) = service(layer);
    serve(&mut svc, &mut handle, "gsk_key1", ok()).await;
    // Key 2's probe goes out (key 1 set aside a moment) and stays out.
    keys.cool_down("key-1", Duration::from_secs(1)).unwrap();
    let probe = spawn(&mut svc, tagged("probe")).await;
    let (bearer, _, probe_reply) = upstream(&mut handle).await;
    assert_eq!(bearer, "Bearer gsk_key2");
    tokio::time::advance(Duration::from_secs(1)).await;
    serve(&mut svc, &mut handle, "gsk_key1", ok()).await;

    let call = spawn(&mut svc, tagged("r")).await;
    let (bearer, _, reply) = upstream(&mut handle).await;
    assert_eq!(bearer, "Bearer gsk_key1");
    reply.send_response(response(500, &[], r#"{"error":{"message":"internal"}}"#));
    // Wrong: the same request goes straight back to key 1, which has just failed it.
    no_upstream_call(&mut handle).await;
    probe_reply.send_response(ok());
    probe.await.unwrap().unwrap();
    let (_, t, reply) = upstream(&mut handle).await;
    assert_eq!(t, "r");
    reply.send_response(ok());
    call.await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------------------
// 2. The probe backoff doubles cooldowns the provider never refused with.
// ---------------------------------------------------------------------------------------

/// A success said the window is used up (`remaining 0`, resets in 10 s): a `Drained`
/// cooldown, no refusal. The first 429 after it (retry in 2 s) is the provider's first
/// refusal, yet the key is set aside for twice the drained window (20 s).
#[tokio::test(start_paused = true)]
async fn a_drained_window_is_not_a_refusal_to_back_off_from() {
    let (mut svc, mut handle, keys) = service(KeyFallbackLayer::new(support::keys(1)));
    serve(&mut svc, &mut handle, "gsk_key1", ok()).await;
    let drained = response(
        200,
        &[
            ("x-ratelimit-limit-requests", "5"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "10s"),
        ],
        "{}",
    );
    serve(&mut svc, &mut handle, "gsk_key1", drained).await;
    assert_eq!(
        cooling(&keys, "key-1"),
        (Duration::from_secs(10), CooldownReason::Drained)
    );
    tokio::time::advance(Duration::from_secs(10)).await;
    refused(&mut svc, &mut handle, request(), limited("2")).await;
    assert_eq!(
        cooling(&keys, "key-1").0,
        Duration::from_secs(2),
        "one refusal: the provider's 2 s, not twice the drained window"
    );
}

/// `last_cool_ms` is written by every cooldown, a bucket's too. A key half-open after a
/// 10 s key-level cooldown is probed by a request for bucket "m", which that bucket's own
/// limit refuses for 50 min (a 429 under `long_wait_is_quota`): the key serves the other
/// buckets meanwhile. Then a plain request's probe is refused for 2 s, and the whole key is
/// set aside for 100 min (twice bucket m's cooldown), every bucket with it.
#[tokio::test(start_paused = true)]
async fn a_buckets_cooldown_is_not_what_the_keys_backoff_doubles() {
    let (mut svc, mut handle, keys) = service(KeyFallbackLayer::new(support::keys(1)));
    serve(&mut svc, &mut handle, "gsk_key1", ok()).await;
    refused(&mut svc, &mut handle, request(), limited("10")).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    refused(&mut svc, &mut handle, in_bucket("m", "m"), limited("3000")).await;
    refused(&mut svc, &mut handle, request(), limited("2")).await;
    let (left, _) = cooling(&keys, "key-1");
    assert!(
        left <= Duration::from_secs(20),
        "key set aside for {left:?}: twice bucket m's cooldown, not twice its own 10 s"
    );
}

// ---------------------------------------------------------------------------------------
// 3. A request queued behind another waiter waits longer than `wait_for_key`.
// ---------------------------------------------------------------------------------------

/// Two requests arrive together while the only key is set aside for 8 s, with
/// `wait_for_key(10 s)`. The first probes the key at 8 s and is refused for 3 s more (back at
/// 11 s, past both requests' 10 s): it gives up. The second, which arrived with it, should
/// give up too; but it queued behind the first (`Driver::start`: others wait), so its limit
/// only started when it got its turn at 8 s, and it is sent at 11 s.
#[tokio::test(start_paused = true)]
async fn a_request_queued_behind_another_waits_no_longer_than_wait_for_key() {
    let layer = KeyFallbackLayer::builder(support::keys(1))
        .wait_for_key(Duration::from_secs(10))
        .build();
    let (mut svc, mut handle, keys) = service(layer);
    serve(&mut svc, &mut handle, "gsk_key1", ok()).await;
    keys.cool_down("key-1", Duration::from_secs(8)).unwrap();
    let start = Instant::now();
    let first = spawn_unready(&svc, tagged("w1")).await;
    let second = spawn_unready(&svc, tagged("w2")).await;
    assert_eq!(keys.status().waiting, 2);
    let (_, t, reply) = upstream(&mut handle).await;
    assert_eq!(
        (t.as_str(), start.elapsed()),
        ("w1", Duration::from_secs(8))
    );
    reply.send_response(limited("3"));
    assert!(
        first.await.unwrap().is_err(),
        "key back at 11 s: past w1's 10 s"
    );
    let sent = tokio::time::timeout(Duration::from_secs(60), handle.next_request()).await;
    assert!(
        sent.is_err(),
        "w2 arrived with w1 but was sent at {:?}, past its 10 s wait_for_key",
        start.elapsed()
    );
    assert!(second.await.unwrap().is_err());
}

// ---------------------------------------------------------------------------------------
// 4. Waiting ignores the request's token cost: a request no key can fit waits the whole
//    `wait_for_key` (polling every 50 ms), and every request behind it waits too.
// ---------------------------------------------------------------------------------------

/// Key 1 has 1,000 tokens left until its window resets in 60 s. A request of 5,000 tokens
/// can be served by no key within `wait_for_key(5 s)`: it should fail at once, as a request
/// for a key further off than the wait does. `soonest` sees a key "due now" (the key is not
/// blocked, the cost just does not fit), so the request waits out the 5 s.
#[tokio::test(start_paused = true)]
async fn a_request_whose_cost_fits_no_key_within_the_wait_fails_at_once() {
    let layer = KeyFallbackLayer::builder(support::keys(1))
        .wait_for_key(Duration::from_secs(5))
        .build();
    let (mut svc, mut handle, _keys) = service(layer);
    let tokens = response(
        200,
        &[
            ("x-ratelimit-remaining-tokens", "1000"),
            ("x-ratelimit-reset-tokens", "60s"),
        ],
        "{}",
    );
    serve(&mut svc, &mut handle, "gsk_key1", tokens).await;
    let start = Instant::now();
    let big = spawn(&mut svc, costing("big", 5000)).await;
    let err = big.await.unwrap().unwrap_err();
    assert!(err.is::<Exhausted>(), "{err}");
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "no key fits 5,000 tokens within 5 s: no reason to wait"
    );
}

/// The same key, same window: while the 5,000-token request waits, a 10-token request that
/// the key can serve at once finds "others waiting" in the lane and queues behind it, for
/// the whole 5 s.
#[tokio::test(start_paused = true)]
async fn a_request_a_key_can_serve_now_does_not_queue_behind_one_that_does_not_fit() {
    let layer = KeyFallbackLayer::builder(support::keys(1))
        .wait_for_key(Duration::from_secs(5))
        .build();
    let (mut svc, mut handle, _keys) = service(layer);
    let tokens = response(
        200,
        &[
            ("x-ratelimit-remaining-tokens", "1000"),
            ("x-ratelimit-reset-tokens", "60s"),
        ],
        "{}",
    );
    serve(&mut svc, &mut handle, "gsk_key1", tokens).await;
    let start = Instant::now();
    let big = spawn(&mut svc, costing("big", 5000)).await;
    tokio::task::yield_now().await;
    let small = spawn(&mut svc, costing("small", 10)).await;
    let (_, t, reply) = upstream(&mut handle).await;
    assert_eq!(t, "small");
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "the 10-token request fits key 1 now, but waited behind the 5,000-token one"
    );
    reply.send_response(ok());
    small.await.unwrap().unwrap();
    let _ = big.await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 5. A bucket's probe is not tied to the request that took it: a stale probe's end frees
//    (or opens) the next probe.
// ---------------------------------------------------------------------------------------

/// Bucket "m" comes out of a cooldown: P1 probes it and hangs. After the probe wait others
/// go; one is refused, so "m" cools again, and at its end P3 probes it. Now P1 is dropped:
/// `Lanes::end_probe` sees "a probe out" (P3's) and gives it back as if it were P1's, so a
/// further request probes "m" beside P3. (P1 answering 200 instead opens "m" to everyone.)
#[tokio::test(start_paused = true)]
async fn a_stale_bucket_probe_ending_does_not_free_the_current_probe() {
    let (mut svc, mut handle, _keys) = service(KeyFallbackLayer::new(support::keys(1)));
    serve(&mut svc, &mut handle, "gsk_key1", ok()).await;
    refused(&mut svc, &mut handle, in_bucket("r0", "m"), limited("5")).await;
    tokio::time::advance(Duration::from_secs(5)).await;
    let p1 = spawn(&mut svc, in_bucket("p1", "m")).await;
    let (_, t, p1_reply) = upstream(&mut handle).await;
    assert_eq!(t, "p1");
    // Past the probe wait: another request goes, and is refused (m cools 10 s, backed off).
    tokio::time::advance(Duration::from_secs(1)).await;
    refused(&mut svc, &mut handle, in_bucket("r2", "m"), limited("5")).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    let p3 = spawn(&mut svc, in_bucket("p3", "m")).await;
    let (_, t, p3_reply) = upstream(&mut handle).await;
    assert_eq!(t, "p3");
    // P1, sent before the last cooldown, is dropped.
    p1.abort();
    let _ = p1.await;
    drop(p1_reply);
    let r4 = spawn(&mut svc, in_bucket("r4", "m")).await;
    // Wrong: r4 takes a second probe of "m" while P3's is out.
    no_upstream_call(&mut handle).await;
    p3_reply.send_response(ok());
    p3.await.unwrap().unwrap();
    let (_, t, reply) = upstream(&mut handle).await;
    assert_eq!(t, "r4");
    reply.send_response(ok());
    r4.await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------------------
// 6. A probe out on a key makes a request wait even when that key cannot serve the
//    request's bucket for 50 minutes.
// ---------------------------------------------------------------------------------------

/// Bucket "m" is cooled for 50 min on the only key; the key is half-open at the key level
/// with a probe out (a plain request). A request for "m" can be served by nothing within the
/// probe wait: it should fail at once (no `wait_for_key`), but `Pool::soonest` reports the
/// key-level probe (`probe_ms`) although the lane keeps the key out for 50 min, so
/// `should_wait` holds the request for the 1 s probe wait, and then it fails anyway.
#[tokio::test(start_paused = true)]
async fn a_probe_on_a_key_the_bucket_has_set_aside_is_not_waited_for() {
    let (mut svc, mut handle, keys) = service(KeyFallbackLayer::new(support::keys(1)));
    serve(&mut svc, &mut handle, "gsk_key1", ok()).await;
    refused(&mut svc, &mut handle, in_bucket("r0", "m"), limited("3000")).await;
    keys.cool_down("key-1", Duration::from_secs(1)).unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    let probe = spawn(&mut svc, tagged("probe")).await;
    let (_, _, probe_reply) = upstream(&mut handle).await;
    assert!(probe_in_flight(&keys, "key-1"));
    let start = Instant::now();
    let call = spawn(&mut svc, in_bucket("m", "m")).await;
    let err = call.await.unwrap().unwrap_err();
    assert!(err.is::<Exhausted>(), "{err}");
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "bucket m is out for 50 min: nothing to wait for"
    );
    probe_reply.send_response(ok());
    probe.await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------------------
// 7. A probe taken on the way to an inner call that panics is never given back.
// ---------------------------------------------------------------------------------------

/// `ResponseFuture::start` takes the key's probe (and its budget claim) in a local `Driver`,
/// then calls the inner service. If that call panics, the driver, which has no `Drop`, is
/// lost with the probe: the key shows a probe in flight that nobody holds, and the next
/// request waits the probe wait for it (its budget claim, and any token reservation, leak
/// for good).
#[tokio::test(start_paused = true)]
async fn a_panic_in_the_inner_call_gives_the_probe_back() {
    let panic_next = Arc::new(AtomicBool::new(true));
    let flag = panic_next.clone();
    let inner = tower::service_fn(move |_req: Req| {
        if flag.swap(false, Ordering::SeqCst) {
            panic!("inner service panicked in call");
        }
        std::future::ready(Ok::<Res, BoxError>(ok()))
    });
    let layer = KeyFallbackLayer::new(support::keys(1));
    let keys = layer.handle();
    let mut svc = layer.layer(inner);
    svc.ready().await.unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(svc.call(request()));
    }));
    assert!(caught.is_err());
    assert!(
        !probe_in_flight(&keys, "key-1"),
        "the panicked call's probe is still out"
    );
    let start = Instant::now();
    svc.ready().await.unwrap().call(request()).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
}

// ---------------------------------------------------------------------------------------
// 8. A reset while a probe is out, then a new probe in the same millisecond: the old probe's
//    end must not free the new one (the probe's word would be the same).
// ---------------------------------------------------------------------------------------

/// P1 probes a key not heard from; the key is reset (still not heard from: the reset keeps
/// P1's probe, so no second probe can take an identical word in the same millisecond). P2
/// waits for P1's answer; P1 is dropped and P2 takes the probe, and P3 waits for P2's answer
/// rather than probe beside it.
#[tokio::test(start_paused = true)]
async fn a_probe_from_before_a_reset_does_not_end_the_next_probe() {
    let layer = KeyFallbackLayer::builder(support::keys(1))
        .probe_wait(Duration::from_secs(10))
        .build();
    let (mut svc, mut handle, keys) = service(layer);
    let p1 = spawn(&mut svc, tagged("p1")).await;
    let (_, _, p1_reply) = upstream(&mut handle).await;
    keys.reset("key-1").unwrap();
    let p2 = spawn(&mut svc, tagged("p2")).await;
    no_upstream_call(&mut handle).await;
    p1.abort();
    let _ = p1.await;
    drop(p1_reply);
    let (_, t, p2_reply) = upstream(&mut handle).await;
    assert_eq!(t, "p2");
    assert!(probe_in_flight(&keys, "key-1"), "P2 probes");
    let p3 = spawn(&mut svc, tagged("p3")).await;
    no_upstream_call(&mut handle).await;
    p2_reply.send_response(ok());
    p2.await.unwrap().unwrap();
    let (_, _, reply) = upstream(&mut handle).await;
    reply.send_response(ok());
    p3.await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------------------
// 9. Keys of one group (one shared limit) each get a probe of their own after the group's
//    cooldown: one refusal per key, not one for the limit.
// ---------------------------------------------------------------------------------------

/// Keys 1 and 2 share one limit (`.group`). A 429 on key 1 cools both. When the cooldown
/// ends, P1 probes key 1; P2 should wait for P1's answer (the limit they share is what is
/// being probed), but each key is half-open on its own in `Pool` (the key-level probe is per
/// key, not per owner as a bucket's is), so P2 probes key 2 at once: two requests on a limit
/// that may still refuse both.
#[tokio::test(start_paused = true)]
async fn a_group_sharing_one_limit_is_probed_by_one_request() {
    let layer = KeyFallbackLayer::builder(support::keys(2))
        .group(["key-1", "key-2"])
        .build();
    let (mut svc, mut handle, keys) = service(layer);
    // A cold burst: both keys probed and heard from.
    let a = spawn(&mut svc, request()).await;
    let b = spawn(&mut svc, request()).await;
    for _ in 0..2 {
        let (_, _, reply) = upstream(&mut handle).await;
        reply.send_response(ok());
    }
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    refused(&mut svc, &mut handle, request(), limited("5")).await;
    assert!(matches!(
        cooling(&keys, "key-2").1,
        CooldownReason::RateLimited
    ));
    tokio::time::advance(Duration::from_secs(5)).await;
    let p1 = spawn(&mut svc, tagged("p1")).await;
    let (bearer, _, p1_reply) = upstream(&mut handle).await;
    assert_eq!(bearer, "Bearer gsk_key1");
    let p2 = spawn(&mut svc, tagged("p2")).await;
    // Wrong: P2 probes the same limit through key 2.
    no_upstream_call(&mut handle).await;
    p1_reply.send_response(ok());
    p1.await.unwrap().unwrap();
    let (_, t, reply) = upstream(&mut handle).await;
    assert_eq!(t, "p2");
    reply.send_response(ok());
    p2.await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------------------
// 10. The backoff's "last cooldown" is the last hint recorded, not the cooldown the key had.
// ---------------------------------------------------------------------------------------

/// Two requests in flight on key 1 are refused: one for 30 s, then one for 2 s. The key
/// rightly stays out 30 s (a cooldown is never shortened), but `Pool::record` stores 2 s as
/// its last cooldown. The probe at 30 s is refused again (2 s asked): the key should wait at
/// least twice its last cooldown (60 s); it waits 4 s.
#[tokio::test(start_paused = true)]
async fn the_backoff_doubles_the_cooldown_the_key_had_not_the_last_hint() {
    let (mut svc, mut handle, keys) = service(KeyFallbackLayer::new(support::keys(1)));
    serve(&mut svc, &mut handle, "gsk_key1", ok()).await;
    let a = spawn(&mut svc, request()).await;
    let b = spawn(&mut svc, request()).await;
    let (_, _, ra) = upstream(&mut handle).await;
    let (_, _, rb) = upstream(&mut handle).await;
    ra.send_response(limited("30"));
    assert!(a.await.unwrap().is_err());
    rb.send_response(limited("2"));
    assert!(b.await.unwrap().is_err());
    assert_eq!(cooling(&keys, "key-1").0, Duration::from_secs(30));
    tokio::time::advance(Duration::from_secs(30)).await;
    refused(&mut svc, &mut handle, request(), limited("2")).await;
    let (left, _) = cooling(&keys, "key-1");
    assert!(
        left >= Duration::from_secs(60),
        "refused right after a 30 s cooldown, the key waits only {left:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 11. `cursor_for` reads lane bits that `Lanes::maybe_recover` has not restored yet.
// ---------------------------------------------------------------------------------------

fn with_affinity(value: &str) -> Req {
    let mut req = request();
    req.extensions_mut()
        .insert(tower_key_fallback::Affinity::new(value));
    req
}

/// A value whose key is key 2. Key 2's window is spent (a success with `remaining 0`, reset
/// in 10 s). At 10 s key 2 can serve again, and the value's next request should land on it
/// (it probes the key); `Pool::cursor_for` recovers the key-level state but not the lane's
/// bits, still cleared, so it ranks key 1 first and the value moves to key 1.
#[tokio::test(start_paused = true)]
async fn an_affinity_value_returns_to_its_key_when_the_keys_window_ends() {
    let (mut svc, mut handle, _keys) = service(KeyFallbackLayer::new(support::keys(2)));
    let a = spawn(&mut svc, request()).await;
    let b = spawn(&mut svc, request()).await;
    for _ in 0..2 {
        let (_, _, reply) = upstream(&mut handle).await;
        reply.send_response(ok());
    }
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    let mut value = None;
    for i in 0..64 {
        let v = format!("conversation-{i}");
        let call = spawn(&mut svc, with_affinity(&v)).await;
        let (bearer, _, reply) = upstream(&mut handle).await;
        reply.send_response(ok());
        call.await.unwrap().unwrap();
        if bearer == "Bearer gsk_key2" {
            value = Some(v);
            break;
        }
    }
    let value = value.expect("a value ranked on key 2");
    let call = spawn(&mut svc, with_affinity(&value)).await;
    let (bearer, _, reply) = upstream(&mut handle).await;
    assert_eq!(bearer, "Bearer gsk_key2");
    reply.send_response(response(
        200,
        &[
            ("x-ratelimit-limit-requests", "5"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "10s"),
        ],
        "{}",
    ));
    call.await.unwrap().unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    let call = spawn(&mut svc, with_affinity(&value)).await;
    let (bearer, _, reply) = upstream(&mut handle).await;
    reply.send_response(ok());
    call.await.unwrap().unwrap();
    assert_eq!(
        bearer, "Bearer gsk_key2",
        "the value moved off its usable key"
    );
}
