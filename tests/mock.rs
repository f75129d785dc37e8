//! The service against tower-test mocks, on tokio's paused clock.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::advance;
use tower::{Layer, Service, ServiceExt};
use tower_key_fallback::{
    CooldownReason, Credential, DisableReason, Exhausted, KeyFallbackLayer, KeySet, KeyState,
};
use tower_test::mock;

mod support;
use support::*;

#[tokio::test(start_paused = true)]
async fn first_key_serves_and_caller_credentials_are_replaced() {
    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(self::keys(3)));
    handle.allow(1);
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(request()));
    let (req, send) = next(&mut handle).await;
    assert_eq!(bearer(&req), "Bearer gsk_key1");
    assert!(req.headers().get("x-api-key").is_none());
    assert_eq!(req.headers()["x-request-tag"], "t1");
    send.send_response(response(200, &[], "ok"));
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "ok");
    let s = keys.status();
    assert_eq!((s.keys[0].requests, s.keys[0].successes), (1, 1));
    assert_eq!(s.keys[1].requests, 0);
}

#[tokio::test(start_paused = true)]
async fn rate_limit_moves_to_next_key_and_traffic_returns_after_reset() {
    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(self::keys(3)));
    let res = exchange(
        &mut svc,
        &mut handle,
        vec![
            ("gsk_key1", response(429, &[("retry-after", "7")], GROQ_429)),
            ("gsk_key2", response(200, &[], "ok")),
        ],
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        cooling(&keys, "key-1"),
        (Duration::from_secs(7), CooldownReason::RateLimited)
    );
    // While key 1 cools, key 2 serves directly.
    advance(Duration::from_secs(6)).await;
    exchange(
        &mut svc,
        &mut handle,
        vec![("gsk_key2", response(200, &[], "ok"))],
    )
    .await
    .unwrap();
    // After the provider's reset, the primary is back.
    advance(Duration::from_secs(1)).await;
    exchange(
        &mut svc,
        &mut handle,
        vec![("gsk_key1", response(200, &[], "ok"))],
    )
    .await
    .unwrap();
    let s = keys.status();
    assert_eq!(s.keys[0].rate_limited, 1);
    assert_eq!(s.keys[0].requests, 2);
    assert_eq!(s.keys[1].requests, 2);
}

#[tokio::test(start_paused = true)]
async fn cooldown_comes_from_each_provider_signal_in_order() {
    type Case = (Vec<(&'static str, &'static str)>, &'static str, Duration);
    let cases: Vec<Case> = vec![
        (
            vec![("retry-after-ms", "1500"), ("retry-after", "9")],
            "{}",
            Duration::from_millis(1500),
        ),
        (vec![("retry-after", "9")], GROQ_429, Duration::from_secs(9)),
        (
            vec![
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "2m59.56s"),
                ("x-ratelimit-remaining-tokens", "100"),
                ("x-ratelimit-reset-tokens", "7.66s"),
            ],
            "{}",
            Duration::from_millis(179_560),
        ),
        (vec![], GROQ_429, Duration::from_secs(2)),
        (
            vec![],
            r#"{"error":{"retryDelay":"15s"}}"#,
            Duration::from_secs(15),
        ),
        // No signal at all: the documented default, a full minute.
        (vec![], "{}", Duration::from_secs(60)),
    ];
    for (headers, body, want) in cases {
        let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(self::keys(2)));
        exchange(
            &mut svc,
            &mut handle,
            vec![
                ("gsk_key1", response(429, &headers, body)),
                ("gsk_key2", response(200, &[], "")),
            ],
        )
        .await
        .unwrap();
        let (remaining, reason) = cooling(&keys, "key-1");
        assert_eq!(
            (remaining, reason),
            (want, CooldownReason::RateLimited),
            "{headers:?} {body}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn exhausted_quota_cools_for_an_hour_not_a_minute() {
    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(self::keys(2)));
    exchange(
        &mut svc,
        &mut handle,
        vec![
            ("gsk_key1", response(429, &[], QUOTA_429)),
            ("gsk_key2", response(200, &[], "")),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        cooling(&keys, "key-1"),
        (Duration::from_secs(3600), CooldownReason::QuotaExhausted)
    );
    advance(Duration::from_secs(120)).await;
    assert!(!keys.status().keys[0].is_available());
    exchange(
        &mut svc,
        &mut handle,
        vec![("gsk_key2", response(200, &[], ""))],
    )
    .await
    .unwrap();
    advance(Duration::from_secs(3480)).await;
    assert!(keys.status().keys[0].is_available());
}

#[tokio::test(start_paused = true)]
async fn a_believable_quota_reset_time_is_used() {
    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(self::keys(2)));
    let tpd = r#"{"error":{"message":"Rate limit reached ... on tokens per day (TPD): Limit 100000, Used 97050, Requested 3619. Please try again in 9m38.016s.","type":"tokens","code":"rate_limit_exceeded"}}"#;
    exchange(
        &mut svc,
        &mut handle,
        vec![
            ("gsk_key1", response(429, &[], tpd)),
            ("gsk_key2", response(200, &[], "")),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        cooling(&keys, "key-1"),
        (
            Duration::from_millis(578_016),
            CooldownReason::QuotaExhausted
        )
    );
}

#[tokio::test(start_paused = true)]
async fn invalid_keys_are_disabled_until_reset() {
    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(self::keys(2)));
    exchange(
        &mut svc,
        &mut handle,
        vec![
            ("gsk_key1", response(401, &[], INVALID_401)),
            ("gsk_key2", response(200, &[], "")),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        state(&keys, "key-1"),
        KeyState::Disabled {
            reason: DisableReason::InvalidKey
        }
    );
    advance(Duration::from_secs(86_400)).await;
    assert!(!keys.status().keys[0].is_available());
    exchange(
        &mut svc,
        &mut handle,
        vec![("gsk_key2", response(200, &[], ""))],
    )
    .await
    .unwrap();
    keys.reset("key-1").unwrap();
    exchange(
        &mut svc,
        &mut handle,
        vec![("gsk_key1", response(200, &[], ""))],
    )
    .await
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn server_errors_count_and_three_in_a_row_set_a_key_aside() {
    let layer = KeyFallbackLayer::builder(keys(2))
        .error_cooldown(Duration::from_secs(30))
        .build();
    let (mut svc, mut handle, keys) = setup(layer);
    for (i, status) in [500u16, 503, 529].into_iter().enumerate() {
        let res = exchange(
            &mut svc,
            &mut handle,
            vec![
                ("gsk_key1", response(status, &[], "")),
                ("gsk_key2", response(200, &[], "")),
            ],
        )
        .await
        .unwrap();
        assert_eq!(res.status(), 200);
        let s = keys.status();
        if i < 2 {
            assert!(s.keys[0].is_available());
            assert_eq!(s.keys[0].consecutive_errors, i as u32 + 1);
        }
    }
    assert_eq!(
        cooling(&keys, "key-1"),
        (Duration::from_secs(30), CooldownReason::Errors)
    );
    advance(Duration::from_secs(30)).await;
    exchange(
        &mut svc,
        &mut handle,
        vec![("gsk_key1", response(200, &[], ""))],
    )
    .await
    .unwrap();
    assert_eq!(keys.status().keys[0].errors, 3);
}

#[tokio::test(start_paused = true)]
async fn old_errors_age_out_and_successes_clear_the_count() {
    let layer = KeyFallbackLayer::builder(keys(2))
        .error_reset_interval(Duration::from_secs(60))
        .build();
    let (mut svc, mut handle, keys) = setup(layer);
    let fail_then_ok = || {
        vec![
            ("gsk_key1", response(502, &[], "")),
            ("gsk_key2", response(200, &[], "")),
        ]
    };
    // Two errors, then a quiet minute: the count starts again.
    exchange(&mut svc, &mut handle, fail_then_ok())
        .await
        .unwrap();
    exchange(&mut svc, &mut handle, fail_then_ok())
        .await
        .unwrap();
    assert_eq!(keys.status().keys[0].consecutive_errors, 2);
    advance(Duration::from_secs(61)).await;
    assert_eq!(keys.status().keys[0].consecutive_errors, 0);
    exchange(&mut svc, &mut handle, fail_then_ok())
        .await
        .unwrap();
    assert!(keys.status().keys[0].is_available());
    assert_eq!(keys.status().keys[0].consecutive_errors, 1);
    // A success clears it too.
    exchange(
        &mut svc,
        &mut handle,
        vec![("gsk_key1", response(200, &[], ""))],
    )
    .await
    .unwrap();
    assert_eq!(keys.status().keys[0].consecutive_errors, 0);
    exchange(&mut svc, &mut handle, fail_then_ok())
        .await
        .unwrap();
    exchange(&mut svc, &mut handle, fail_then_ok())
        .await
        .unwrap();
    assert!(keys.status().keys[0].is_available());
}

#[tokio::test(start_paused = true)]
async fn a_drained_success_cools_the_key_before_any_429() {
    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(self::keys(2)));
    let drained = response(
        200,
        &[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "42s"),
            ("x-ratelimit-remaining-tokens", "5000"),
            ("x-ratelimit-reset-tokens", "1s"),
        ],
        "ok",
    );
    let res = exchange(&mut svc, &mut handle, vec![("gsk_key1", drained)])
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        cooling(&keys, "key-1"),
        (Duration::from_secs(42), CooldownReason::Drained)
    );
    exchange(
        &mut svc,
        &mut handle,
        vec![("gsk_key2", response(200, &[], ""))],
    )
    .await
    .unwrap();
    assert_eq!(keys.status().keys[0].rate_limited, 0);
}

#[tokio::test(start_paused = true)]
async fn the_requests_own_faults_are_handed_back_and_blame_no_key() {
    let too_large = r#"{"error":{"message":"Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Requested 30601. The input or output tokens must be reduced in order to run successfully.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
    let cases = [
        (
            400,
            r#"{"error":{"message":"bad","type":"invalid_request_error"}}"#,
        ),
        (404, "{}"),
        (413, "{}"),
        (422, "{}"),
        (429, too_large),
    ];
    for (status, body) in cases {
        let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(self::keys(3)));
        let res = exchange(
            &mut svc,
            &mut handle,
            vec![("gsk_key1", response(status, &[], body))],
        )
        .await
        .unwrap();
        assert_eq!(res.status(), status);
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), body);
        let s = keys.status();
        assert_eq!(s.available(), 3, "{status}");
        assert_eq!(s.keys[0].errors, 0);
        assert_eq!(s.keys[1].requests, 0);
    }
}

#[tokio::test(start_paused = true)]
async fn round_robin_spreads_over_usable_keys() {
    let layer = KeyFallbackLayer::builder(keys(3)).round_robin().build();
    let (mut svc, mut handle, keys) = setup(layer);
    for key in ["gsk_key1", "gsk_key2", "gsk_key3", "gsk_key1"] {
        exchange(&mut svc, &mut handle, vec![(key, response(200, &[], ""))])
            .await
            .unwrap();
    }
    keys.cool_down("key-2", Duration::from_secs(10)).unwrap();
    for key in ["gsk_key3", "gsk_key3", "gsk_key1"] {
        exchange(&mut svc, &mut handle, vec![(key, response(200, &[], ""))])
            .await
            .unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn exhaustion_returns_a_typed_error_with_the_last_response() {
    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(self::keys(3)));
    let big = "x".repeat(200_000);
    let err = exchange(
        &mut svc,
        &mut handle,
        vec![
            (
                "gsk_key1",
                response(429, &[("retry-after", "30")], GROQ_429),
            ),
            ("gsk_key2", response(429, &[("retry-after", "5")], GROQ_429)),
            ("gsk_key3", response(503, &[("x-last", "yes")], &big)),
        ],
    )
    .await
    .unwrap_err();
    let mut exhausted = err.downcast::<Exhausted>().expect("an Exhausted error");
    assert_eq!(exhausted.attempts(), 3);
    assert_eq!(
        exhausted.retry_after(),
        Some(Duration::ZERO),
        "key 3 is still usable"
    );
    assert_eq!(
        exhausted.last_status(),
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
    let last = exhausted.take_last_response().unwrap();
    assert_eq!(last.headers()["x-last"], "yes");
    let body = last.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), big.len(), "every byte of the last response");
    assert!(keys.status().keys[2].is_available());
}

#[tokio::test(start_paused = true)]
async fn when_every_key_is_cooling_no_request_is_sent() {
    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(self::keys(2)));
    keys.cool_down("key-1", Duration::from_secs(20)).unwrap();
    keys.cool_down("key-2", Duration::from_secs(8)).unwrap();
    let err = exchange(&mut svc, &mut handle, vec![]).await.unwrap_err();
    let exhausted = err.downcast_ref::<Exhausted>().unwrap();
    assert_eq!(exhausted.attempts(), 0);
    assert!(exhausted.last_error().is_none());
    assert_eq!(exhausted.retry_after(), Some(Duration::from_secs(8)));
    assert!(exhausted.last_status().is_none() && exhausted.last_headers().is_none());
    keys.disable("key-1").unwrap();
    keys.disable("key-2").unwrap();
    let err = exchange(&mut svc, &mut handle, vec![]).await.unwrap_err();
    let exhausted = err.downcast_ref::<Exhausted>().unwrap();
    assert_eq!(exhausted.retry_after(), None);
    assert!(exhausted.to_string().contains("every key is disabled"));
}

#[tokio::test(start_paused = true)]
async fn exhausted_response_option_answers_429_with_retry_after() {
    let layer = KeyFallbackLayer::builder(keys(2))
        .exhausted_response(true)
        .build();
    let (mut svc, mut handle, _keys) = setup(layer);
    let res = exchange(
        &mut svc,
        &mut handle,
        vec![
            (
                "gsk_key1",
                response(429, &[("retry-after", "12")], GROQ_429),
            ),
            (
                "gsk_key2",
                response(429, &[("retry-after-ms", "4200")], GROQ_429),
            ),
        ],
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "5");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(std::str::from_utf8(&body)
        .unwrap()
        .contains("keys_exhausted"));
}

#[tokio::test(start_paused = true)]
async fn a_body_that_cannot_be_replayed_is_sent_once() {
    use http_body_util::combinators::BoxBody;
    type BReq = Request<BoxBody<Bytes, Infallible>>;
    let (mock, mut handle) = mock::pair::<BReq, Res>();
    let layer = KeyFallbackLayer::new(keys(2));
    let keys = layer.handle();
    let mut svc = layer.layer(mock);
    handle.allow(2);
    svc.ready().await.unwrap();
    let req = Request::post("https://x/v1")
        .body(BoxBody::new(Full::new(Bytes::from("{}"))))
        .unwrap();
    let call = tokio::spawn(svc.call(req));
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.headers()["authorization"], "Bearer gsk_key1");
    send.send_response(response(429, &[("retry-after", "3")], GROQ_429));
    let res = call.await.unwrap().unwrap();
    // Handed back as it came, and the key still learned its lesson.
    assert_eq!(res.status(), 429);
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        GROQ_429
    );
    assert_eq!(keys.status().keys[1].requests, 0);
    assert!(matches!(
        state(&keys, "key-1"),
        KeyState::CoolingDown { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn the_service_is_driven_ready_before_each_replay() {
    let (mut svc, mut handle, _keys) = setup(KeyFallbackLayer::new(self::keys(2)));
    handle.allow(1);
    svc.ready().await.unwrap();
    let mut call = tokio_test::task::spawn(svc.call(request()));
    let (_, send) = next(&mut handle).await;
    send.send_response(response(503, &[], ""));
    // No capacity for the replay: the future waits in poll_ready, it does not call.
    tokio_test::assert_pending!(call.poll());
    tokio::task::yield_now().await;
    tokio_test::assert_pending!(call.poll());
    handle.allow(1);
    assert!(call.is_woken());
    tokio_test::assert_pending!(call.poll());
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.headers()["authorization"], "Bearer gsk_key2");
    send.send_response(response(200, &[], ""));
    let res = tokio_test::assert_ready_ok!(call.poll());
    assert_eq!(res.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn replays_are_the_same_request_byte_for_byte() {
    #[derive(Clone, Debug, PartialEq)]
    struct Tag(u32);
    let (mut svc, mut handle, _keys) = setup(KeyFallbackLayer::new(self::keys(3)));
    handle.allow(3);
    svc.ready().await.unwrap();
    let mut req = request();
    *req.version_mut() = http::Version::HTTP_2;
    req.extensions_mut().insert(Tag(7));
    let call = tokio::spawn(svc.call(req));
    let mut seen = Vec::new();
    for (status, key) in [(429, "gsk_key1"), (500, "gsk_key2"), (200, "gsk_key3")] {
        let (req, send) = next(&mut handle).await;
        assert_eq!(bearer(&req), format!("Bearer {key}"));
        let (parts, body) = req.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        seen.push((parts, body));
        send.send_response(response(status, &[], "{}"));
    }
    call.await.unwrap().unwrap();
    let (first, first_body) = &seen[0];
    for (parts, body) in &seen[1..] {
        assert_eq!(parts.method, first.method);
        assert_eq!(parts.uri, first.uri);
        assert_eq!(parts.version, http::Version::HTTP_2);
        assert_eq!(parts.extensions.get::<Tag>(), Some(&Tag(7)));
        let strip = |h: &http::HeaderMap| {
            let mut h = h.clone();
            h.remove("authorization");
            h
        };
        assert_eq!(strip(&parts.headers), strip(&first.headers));
        assert_eq!(body, first_body);
    }
}

#[tokio::test(start_paused = true)]
async fn transport_errors_move_to_the_next_key_or_surface_when_disabled() {
    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(self::keys(2)));
    handle.allow(2);
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(request()));
    let (_, send) = next(&mut handle).await;
    send.send_error("connection reset");
    let (req, send) = next(&mut handle).await;
    assert_eq!(bearer(&req), "Bearer gsk_key2");
    send.send_response(response(200, &[], ""));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    assert_eq!(keys.status().keys[0].consecutive_errors, 1);

    let layer = KeyFallbackLayer::builder(self::keys(2))
        .fallback_on_transport_errors(false)
        .build();
    let (mut svc, mut handle, _) = setup(layer);
    handle.allow(1);
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(request()));
    let (_, send) = next(&mut handle).await;
    send.send_error("connection reset");
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), "connection reset");
}

#[tokio::test(start_paused = true)]
async fn a_dropped_request_leaves_the_pool_consistent() {
    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(self::keys(2)));
    handle.allow(1);
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(request()));
    let (_req, _send) = next(&mut handle).await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    let s = keys.status();
    assert_eq!(s.available(), 2);
    assert_eq!(
        (s.keys[0].requests, s.keys[0].successes, s.keys[0].errors),
        (1, 0, 0)
    );
    exchange(
        &mut svc,
        &mut handle,
        vec![("gsk_key1", response(200, &[], ""))],
    )
    .await
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn max_attempts_bounds_the_replays() {
    let layer = KeyFallbackLayer::builder(keys(4)).max_attempts(2).build();
    let (mut svc, mut handle, _) = setup(layer);
    let err = exchange(
        &mut svc,
        &mut handle,
        vec![
            ("gsk_key1", response(503, &[], "")),
            ("gsk_key2", response(503, &[], "")),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(err.downcast_ref::<Exhausted>().unwrap().attempts(), 2);
}

#[tokio::test(start_paused = true)]
async fn reset_all_and_rotate_at_run_time() {
    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(self::keys(2)));
    keys.disable("key-1").unwrap();
    keys.cool_down("key-2", Duration::from_secs(100)).unwrap();
    assert_eq!(keys.status().available(), 0);
    keys.reset_all();
    assert_eq!(keys.status().available(), 2);
    let before = keys.status().keys[0].fingerprint.clone();
    keys.rotate("key-1", "gsk_fresh").unwrap();
    assert_ne!(keys.status().keys[0].fingerprint, before);
    exchange(
        &mut svc,
        &mut handle,
        vec![("gsk_fresh", response(200, &[], ""))],
    )
    .await
    .unwrap();
    assert!(keys
        .rotate("key-1", "bad key")
        .unwrap_err()
        .to_string()
        .contains("key-1"));
    assert!(keys.rotate("nope", "gsk_x").is_err());
}

#[tokio::test(start_paused = true)]
async fn other_credential_headers() {
    let layer = KeyFallbackLayer::builder(keys(1))
        .credential(Credential::Header(http::HeaderName::from_static(
            "x-api-key",
        )))
        .build();
    let (mut svc, mut handle, _) = setup(layer);
    handle.allow(1);
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(request()));
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.headers()["x-api-key"], "gsk_key1");
    assert!(req.headers()["x-api-key"].is_sensitive());
    assert!(req.headers().get("authorization").is_none());
    send.send_response(response(200, &[], ""));
    call.await.unwrap().unwrap();

    let layer = KeyFallbackLayer::builder(keys(1))
        .credential(Credential::None)
        .build();
    let (mut svc, mut handle, _) = setup(layer);
    handle.allow(1);
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(request()));
    let (req, send) = next(&mut handle).await;
    // The inner service signs with the key the pool chose (tests/hardening.rs), never with
    // what the caller set.
    assert!(req.headers().get("authorization").is_none());
    let key = req
        .extensions()
        .get::<tower_key_fallback::KeyInUse>()
        .unwrap();
    assert_eq!((key.label(), key.secret()), ("key-1", "gsk_key1"));
    send.send_response(response(200, &[], ""));
    call.await.unwrap().unwrap();
}

#[test]
fn debug_output_never_shows_a_key() {
    let layer = KeyFallbackLayer::new(KeySet::new(["gsk_topsecret1", "gsk_topsecret2"]).unwrap());
    let handle = layer.handle();
    let svc = layer.layer(tower::service_fn(|_: Req| async {
        Ok::<Res, Infallible>(response(200, &[], ""))
    }));
    let texts = [
        format!("{layer:?}"),
        format!("{handle:?}"),
        format!("{:?}", handle.status()),
        format!("{:?}", svc),
        format!("{:?}", KeySet::new(["gsk_topsecret1"]).unwrap()),
        format!(
            "{:?}",
            KeyFallbackLayer::builder(KeySet::new(["gsk_topsecret1"]).unwrap())
        ),
    ];
    for text in texts {
        assert!(!text.contains("topsecret"), "{text}");
    }
}

/// A `tower::retry` inside the layer retries with the same key; the layer only sees the
/// final answer.
#[tokio::test(start_paused = true)]
async fn a_retry_inside_the_layer_retries_the_same_key() {
    #[derive(Clone)]
    struct OnceOn503(bool);
    impl tower::retry::Policy<Req, Res, tower::BoxError> for OnceOn503 {
        type Future = std::future::Ready<()>;
        fn retry(
            &mut self,
            _: &mut Req,
            result: &mut Result<Res, tower::BoxError>,
        ) -> Option<Self::Future> {
            match result {
                Ok(res) if res.status() == 503 && !self.0 => {
                    self.0 = true;
                    Some(std::future::ready(()))
                }
                _ => None,
            }
        }
        fn clone_request(&mut self, req: &Req) -> Option<Req> {
            Some(req.clone())
        }
    }
    let (mock, mut handle) = mock::pair::<Req, Res>();
    let layer = KeyFallbackLayer::new(keys(2));
    let keys = layer.handle();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .layer(tower::retry::RetryLayer::new(OnceOn503(false)))
        .service(mock);
    handle.allow(2);
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(request()));
    let (req, send) = next(&mut handle).await;
    assert_eq!(bearer(&req), "Bearer gsk_key1");
    send.send_response(response(503, &[], ""));
    let (req, send) = next(&mut handle).await;
    assert_eq!(bearer(&req), "Bearer gsk_key1");
    send.send_response(response(200, &[], ""));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    let s = keys.status();
    assert_eq!(
        (s.keys[0].requests, s.keys[0].errors, s.keys[1].requests),
        (1, 0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn exhausted_response_option_answers_502_when_the_upstream_is_unreachable() {
    let layer = KeyFallbackLayer::builder(keys(2))
        .exhausted_response(true)
        .build();
    let (mut svc, mut handle, _keys) = setup(layer);
    handle.allow(2);
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(request()));
    for _ in 0..2 {
        let (_, send) = next(&mut handle).await;
        send.send_error("connection refused");
    }
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert!(res.headers().get("retry-after").is_none());
}

/// A body type from another crate that cannot be copied (http-body-util's `BoxBody`) goes through the layer
/// wrapped in `SendOnce`: sent once with the first usable key, the key still learning from
/// the answer.
#[tokio::test(start_paused = true)]
async fn a_foreign_body_type_wrapped_in_send_once_is_sent_once() {
    use tower_key_fallback::SendOnce;
    type AReq =
        Request<SendOnce<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>>>;
    let (mock, mut handle) = mock::pair::<AReq, Res>();
    let layer = KeyFallbackLayer::new(keys(2));
    let keys = layer.handle();
    let mut svc = layer.layer(mock);
    handle.allow(2);
    svc.ready().await.unwrap();
    let req = Request::post("https://x/v1")
        .body(SendOnce::new(http_body_util::BodyExt::boxed(
            http_body_util::Full::new(Bytes::from("{}")),
        )))
        .unwrap();
    let call = tokio::spawn(svc.call(req));
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.headers()["authorization"], "Bearer gsk_key1");
    let body = req
        .into_body()
        .into_inner()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, "{}");
    send.send_response(response(503, &[], "down"));
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(keys.status().keys[0].consecutive_errors, 1);
    assert_eq!(keys.status().keys[1].requests, 0);
}
