//! The accounting of budgets, buckets, declared limits and groups, on tower-test mocks and a
//! paused clock: which key each upstream call goes to, given what earlier answers reported.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use support::*;
use tower::{Service, ServiceExt};
use tower_key_fallback::{Bucket, Exhausted, KeyFallbackLayer, KeyState, Limits, TokenCost};

fn ok(remaining: u64, reset: &str) -> Res {
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

fn with(bucket: Option<&str>, cost: Option<u64>) -> Req {
    let mut req = request();
    if let Some(b) = bucket {
        req.extensions_mut().insert(Bucket::new(b));
    }
    if let Some(c) = cost {
        req.extensions_mut().insert(TokenCost(c));
    }
    req
}

type Call = tokio::task::JoinHandle<
    Result<
        http::Response<tower_key_fallback::KeyFallbackBody<Full<Bytes>>>,
        tower_key_fallback::BoxError,
    >,
>;

/// Sends `req` and returns the call and the key its first upstream call carries.
async fn send(
    svc: &mut tower_key_fallback::KeyFallback<Mock>,
    handle: &mut MockHandle,
    req: Req,
) -> (Call, String, tower_test::mock::SendResponse<Res>) {
    handle.allow(1);
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(req));
    let (up, reply) = next(handle).await;
    (call, bearer(&up), reply)
}

/// Sends `req`, which must not reach the upstream: no key can take it.
async fn refused(
    svc: &mut tower_key_fallback::KeyFallback<Mock>,
    handle: &mut MockHandle,
    req: Req,
) -> Exhausted {
    handle.allow(1);
    let err = svc.ready().await.unwrap().call(req).await.unwrap_err();
    *err.downcast::<Exhausted>().expect("Exhausted")
}

#[tokio::test(start_paused = true)]
async fn requests_in_flight_count_against_what_the_provider_reported() {
    let (mut svc, mut handle, _) = setup(KeyFallbackLayer::new(keys(2)));
    let (call, key, reply) = send(&mut svc, &mut handle, request()).await;
    assert_eq!(key, "Bearer gsk_key1");
    reply.send_response(ok(2, "10s"));
    call.await.unwrap().unwrap();
    // Two left: two requests in flight take them, the third goes to key 2 unsent to key 1.
    let mut replies = Vec::new();
    for want in ["gsk_key1", "gsk_key1", "gsk_key2"] {
        let (call, key, reply) = send(&mut svc, &mut handle, request()).await;
        assert_eq!(key, format!("Bearer {want}"));
        replies.push((call, reply));
    }
    for (call, reply) in replies {
        reply.send_response(ok(1, "10s"));
        call.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn an_answer_that_comes_back_late_does_not_raise_the_budget() {
    // Two requests in flight on one key that has not answered yet: without probing, which
    // would send the second to key 2 (tests/recovery.rs).
    let layer = KeyFallbackLayer::builder(keys(2))
        .probe_wait(Duration::ZERO)
        .build();
    let (mut svc, mut handle, _) = setup(layer);
    let (first, _, reply_first) = send(&mut svc, &mut handle, request()).await;
    let (second, key, reply_second) = send(&mut svc, &mut handle, request()).await;
    assert_eq!(key, "Bearer gsk_key1");
    // The provider saw the first, then the second; the second's answer arrives first.
    reply_second.send_response(ok(0, "10s"));
    second.await.unwrap().unwrap();
    reply_first.send_response(ok(1, "10s"));
    first.await.unwrap().unwrap();
    let (call, key, reply) = send(&mut svc, &mut handle, request()).await;
    assert_eq!(key, "Bearer gsk_key2", "key 1 said none is left");
    reply.send_response(ok(4, "10s"));
    call.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_spent_budget_holds_until_its_reset() {
    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(keys(1)));
    let (call, _, reply) = send(&mut svc, &mut handle, request()).await;
    reply.send_response(ok(0, "7.5s"));
    call.await.unwrap().unwrap();
    let exhausted = refused(&mut svc, &mut handle, request()).await;
    assert_eq!(exhausted.attempts(), 0);
    assert_eq!(exhausted.retry_after(), Some(Duration::from_millis(7500)));
    // A success that says none is left sets the key aside as drained, and its budget
    // shows the same, per bucket.
    let status = keys.status();
    assert!(matches!(
        status.keys[0].state,
        KeyState::CoolingDown {
            reason: tower_key_fallback::CooldownReason::Drained,
            ..
        }
    ));
    let b = &status.keys[0].buckets[0];
    assert_eq!(b.bucket, None);
    assert_eq!(b.requests_remaining, Some((0, Duration::from_millis(7500))));
    assert_eq!(b.passed_over_for, Some(Duration::from_millis(7500)));
    tokio::time::advance(Duration::from_millis(7500)).await;
    let (call, key, reply) = send(&mut svc, &mut handle, request()).await;
    assert_eq!(key, "Bearer gsk_key1");
    reply.send_response(ok(4, "10s"));
    call.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn declared_limits_pace_from_the_first_request() {
    let layer = KeyFallbackLayer::builder(keys(2))
        .limits(Limits::new().requests(2, Duration::from_secs(60)))
        .probe_wait(Duration::ZERO)
        .build();
    let (mut svc, mut handle, _) = setup(layer);
    // The answers report nothing: the declared limits alone decide.
    let mut calls = Vec::new();
    for want in ["gsk_key1", "gsk_key1", "gsk_key2", "gsk_key2"] {
        let (call, key, reply) = send(&mut svc, &mut handle, request()).await;
        assert_eq!(key, format!("Bearer {want}"));
        calls.push((call, reply));
    }
    for (call, reply) in calls {
        reply.send_response(response(200, &[], "{}"));
        call.await.unwrap().unwrap();
    }
    let exhausted = refused(&mut svc, &mut handle, request()).await;
    assert_eq!(exhausted.retry_after(), Some(Duration::from_secs(60)));
    // A new window at the reset.
    tokio::time::advance(Duration::from_secs(60)).await;
    let (call, key, reply) = send(&mut svc, &mut handle, request()).await;
    assert_eq!(key, "Bearer gsk_key1");
    reply.send_response(response(200, &[], "{}"));
    call.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_in_one_bucket_leaves_the_key_serving_the_others() {
    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(keys(1)));
    let (call, _, reply) = send(&mut svc, &mut handle, with(Some("busy"), None)).await;
    reply.send_response(response(429, &[("retry-after", "30")], GROQ_429));
    call.await.unwrap().unwrap_err();
    let exhausted = refused(&mut svc, &mut handle, with(Some("busy"), None)).await;
    assert_eq!(exhausted.retry_after(), Some(Duration::from_secs(30)));
    // Other buckets, and requests that name none, still have the key.
    for req in [with(Some("quiet"), None), request()] {
        let (call, key, reply) = send(&mut svc, &mut handle, req).await;
        assert_eq!(key, "Bearer gsk_key1");
        reply.send_response(ok(3, "10s"));
        call.await.unwrap().unwrap();
    }
    let status = keys.status();
    assert_eq!(status.keys[0].state, KeyState::Active);
    let busy = status.keys[0]
        .buckets
        .iter()
        .find(|b| b.bucket.as_deref() == Some("busy"))
        .unwrap();
    assert_eq!(busy.passed_over_for, Some(Duration::from_secs(30)));
}

#[tokio::test(start_paused = true)]
async fn a_spent_quota_and_an_invalid_key_hold_in_every_bucket() {
    let (mut svc, mut handle, _) = setup(KeyFallbackLayer::new(keys(2)));
    let (call, _, reply) = send(&mut svc, &mut handle, with(Some("a"), None)).await;
    handle.allow(1);
    reply.send_response(response(429, &[], QUOTA_429));
    let (up, reply) = next(&mut handle).await;
    assert_eq!(bearer(&up), "Bearer gsk_key2");
    reply.send_response(response(401, &[], INVALID_401));
    call.await.unwrap().unwrap_err();
    let exhausted = refused(&mut svc, &mut handle, with(Some("b"), None)).await;
    assert_eq!(exhausted.attempts(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_group_is_cooled_together_and_counts_one_budget() {
    let layer = KeyFallbackLayer::builder(keys(3))
        .group(["key-1", "key-2"])
        .build();
    let (mut svc, mut handle, keys) = setup(layer);
    let (call, _, reply) = send(&mut svc, &mut handle, request()).await;
    handle.allow(1);
    reply.send_response(response(429, &[("retry-after", "20")], GROQ_429));
    let (up, reply) = next(&mut handle).await;
    assert_eq!(bearer(&up), "Bearer gsk_key3", "key 2 shares key 1's limit");
    reply.send_response(ok(4, "10s"));
    call.await.unwrap().unwrap();
    assert_eq!(cooling(&keys, "key-2").0, Duration::from_secs(20));
    let shared = keys.status().shared_limits;
    assert_eq!(shared.len(), 1);
    assert_eq!(shared[0].keys, ["key-1", "key-2"]);
    assert!(shared[0].declared);
    // An unknown label is an error that names it.
    let err = KeyFallbackLayer::builder(support::keys(2))
        .group(["key-1", "key-9"])
        .try_build()
        .unwrap_err();
    assert!(err.to_string().contains("key-9"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn token_costs_pass_over_a_key_without_tokens_for_them() {
    let layer = KeyFallbackLayer::builder(keys(2))
        .probe_wait(Duration::ZERO)
        .build();
    let (mut svc, mut handle, _) = setup(layer);
    let (call, _, reply) = send(&mut svc, &mut handle, with(None, Some(100))).await;
    reply.send_response(response(
        200,
        &[
            ("x-ratelimit-remaining-tokens", "500"),
            ("x-ratelimit-reset-tokens", "30s"),
        ],
        "{}",
    ));
    call.await.unwrap().unwrap();
    // 500 left: a 600-token request goes to key 2, a 300 and then a 150 to key 1 (the 300
    // is in flight), and another 150 does not fit beside them.
    let mut open = Vec::new();
    for (cost, want) in [
        (600, "gsk_key2"),
        (300, "gsk_key1"),
        (150, "gsk_key1"),
        (150, "gsk_key2"),
    ] {
        let (call, key, reply) = send(&mut svc, &mut handle, with(None, Some(cost))).await;
        assert_eq!(key, format!("Bearer {want}"), "cost {cost}");
        open.push((call, reply));
    }
    for (call, reply) in open {
        reply.send_response(response(200, &[], "{}"));
        call.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_request_gives_back_its_place_in_flight() {
    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(keys(1)));
    let (call, _, reply) = send(&mut svc, &mut handle, request()).await;
    let in_flight = |keys: &tower_key_fallback::KeyHandle| {
        keys.status().keys[0].buckets.first().map(|b| b.in_flight)
    };
    assert_eq!(in_flight(&keys), Some(1));
    call.abort();
    let _ = call.await;
    drop(reply);
    assert_eq!(
        in_flight(&keys),
        None,
        "nothing in flight, nothing reported"
    );
}

#[tokio::test(start_paused = true)]
async fn a_reset_forgets_the_budgets() {
    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(keys(1)));
    let (call, _, reply) = send(&mut svc, &mut handle, with(Some("m"), None)).await;
    reply.send_response(ok(0, "1h0m0s"));
    call.await.unwrap().unwrap();
    refused(&mut svc, &mut handle, with(Some("m"), None)).await;
    keys.reset_all();
    let (call, key, reply) = send(&mut svc, &mut handle, with(Some("m"), None)).await;
    assert_eq!(key, "Bearer gsk_key1");
    reply.send_response(ok(3, "10s"));
    call.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn keys_whose_counts_move_together_are_said_to_share_a_limit() {
    let warnings = Warnings::default();
    let layer = KeyFallbackLayer::builder(keys(3))
        .events(warnings.clone())
        .build();
    let (mut svc, mut handle, keys) = setup(layer);
    let limited = |remaining: &str| {
        response(
            200,
            &[
                ("x-ratelimit-limit-requests", "5"),
                ("x-ratelimit-remaining-requests", remaining),
                ("x-ratelimit-reset-requests", "10s"),
            ],
            "{}",
        )
    };
    // Key 1 spends its window; then key 2's first answer says its own window of the same
    // limit is spent too, though it sent one request.
    let (call, _, reply) = send(&mut svc, &mut handle, request()).await;
    reply.send_response(limited("0"));
    call.await.unwrap().unwrap();
    let (call, key, reply) = send(&mut svc, &mut handle, request()).await;
    assert_eq!(key, "Bearer gsk_key2");
    handle.allow(1);
    reply.send_response(response(
        429,
        &[
            ("retry-after", "10"),
            ("x-ratelimit-limit-requests", "5"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "10s"),
        ],
        GROQ_429,
    ));
    let (up, reply) = next(&mut handle).await;
    assert_eq!(bearer(&up), "Bearer gsk_key3");
    reply.send_response(limited("4"));
    call.await.unwrap().unwrap();
    assert_eq!(*warnings.0.lock().unwrap(), ["key-2+key-1"]);
    let shared = keys.status().shared_limits;
    assert_eq!(shared.len(), 1);
    assert_eq!(shared[0].keys, ["key-1", "key-2"]);
    assert!(!shared[0].declared);
}

#[tokio::test(start_paused = true)]
async fn a_reported_reset_is_capped_like_every_wait() {
    let layer = KeyFallbackLayer::builder(keys(1))
        .max_cooldown(Duration::from_secs(3600))
        .build();
    let (mut svc, mut handle, keys) = setup(layer);
    // A broken upstream: none left, whole again in 11 years. The key is passed over for the
    // hour `max_cooldown` allows, in its bucket and as a drained key.
    let (call, _, reply) = send(&mut svc, &mut handle, with(Some("m"), None)).await;
    reply.send_response(response(
        200,
        &[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "99999h"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "99999h"),
        ],
        "{}",
    ));
    call.await.unwrap().unwrap();
    let status = keys.status();
    let bucket = &status.keys[0].buckets[0];
    assert_eq!(bucket.passed_over_for, Some(Duration::from_secs(3600)));
    assert_eq!(
        bucket.requests_remaining,
        Some((0, Duration::from_secs(3600)))
    );
    tokio::time::advance(Duration::from_secs(3600)).await;
    let (call, key, reply) = send(&mut svc, &mut handle, with(Some("m"), None)).await;
    assert_eq!(key, "Bearer gsk_key1");
    reply.send_response(ok(3, "10s"));
    call.await.unwrap().unwrap();
}
