//! Regression tests from an adversarial review of the budgets: each failed before its fix.

mod support;

use std::time::Duration;

use support::*;
use tower::{Service, ServiceExt};
use tower_key_fallback::{Bucket, KeyFallbackLayer};

fn ok(limit: &str, remaining: &str, reset: Option<&str>) -> Res {
    let mut h = vec![
        ("x-ratelimit-limit-requests", limit),
        ("x-ratelimit-remaining-requests", remaining),
    ];
    if let Some(r) = reset {
        h.push(("x-ratelimit-reset-requests", r));
    }
    response(200, &h, "{}")
}

fn bucket(b: &str) -> Req {
    let mut req = request();
    req.extensions_mut().insert(Bucket::new(b));
    req
}

/// Sends `req`; Ok(the key of its first upstream call, its reply, the call) or Err(what the
/// call came to without reaching the upstream).
async fn reach(
    svc: &mut tower_key_fallback::KeyFallback<Mock>,
    handle: &mut MockHandle,
    req: Req,
) -> Result<
    (
        String,
        tower_test::mock::SendResponse<Res>,
        tokio::task::JoinHandle<
            Result<
                http::Response<
                    tower_key_fallback::KeyFallbackBody<http_body_util::Full<bytes::Bytes>>,
                >,
                tower_key_fallback::BoxError,
            >,
        >,
    ),
    String,
> {
    handle.allow(1);
    svc.ready().await.unwrap();
    let mut call = tokio::spawn(svc.call(req));
    tokio::select! {
        biased;
        up = handle.next_request() => {
            let (up, reply) = up.unwrap();
            Ok((bearer(&up), reply, call))
        }
        r = &mut call => Err(format!("{:?}", r.unwrap().map(|_| ()))),
    }
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// 3 / 4: a claim released unsent (request dropped while readying a replay) frees a slot of
/// the budget, but the lane bit cleared meanwhile is not restored until the reset.
#[tokio::test(start_paused = true)]
async fn a_released_claim_gives_the_key_back() {
    let layer = KeyFallbackLayer::builder(keys(2)).round_robin().build();
    let (mut svc, mut handle, keys) = setup(layer);
    // key1: one request left for 10s.
    let (k, reply, call) = reach(&mut svc, &mut handle, request()).await.unwrap();
    assert_eq!(k, "Bearer gsk_key1");
    reply.send_response(ok("5", "1", Some("10s")));
    call.await.unwrap().unwrap();
    // A: key2 fails with a 500, the replay claims key1's last slot and waits in poll_ready.
    let (k, reply, a) = reach(&mut svc, &mut handle, request()).await.unwrap();
    assert_eq!(k, "Bearer gsk_key2");
    reply.send_response(response(500, &[], "{}"));
    settle().await;
    assert_eq!(
        keys.status().keys[0].buckets[0].in_flight,
        1,
        "A holds key1's slot"
    );
    // B: key1 is full (its bit is cleared); key2 answers that it is drained.
    let (k, reply, b) = reach(&mut svc, &mut handle, request()).await.unwrap();
    assert_eq!(k, "Bearer gsk_key2");
    reply.send_response(ok("5", "0", Some("10s")));
    b.await.unwrap().unwrap();
    // A is dropped before its replay is sent: key1 has its slot back.
    a.abort();
    let _ = a.await;
    settle().await;
    let st = keys.status();
    assert_eq!(st.keys[0].buckets[0].in_flight, 0);
    assert_eq!(
        st.keys[0].buckets[0].passed_over_for, None,
        "the budget says usable"
    );
    match reach(&mut svc, &mut handle, request()).await {
        Ok((k, _, _)) => assert_eq!(k, "Bearer gsk_key1"),
        Err(e) => panic!("key1 has a slot but is passed over until its reset: {e}"),
    }
}

/// 2: 64 bucket names a client makes up fill the bucket table for good; a real model's
/// rate limit then lands in the default lane and takes the key from every request that
/// names no bucket (and from every other model).
#[tokio::test(start_paused = true)]
async fn made_up_bucket_names_cannot_merge_other_models_into_one_lane() {
    let (mut svc, mut handle, _) = setup(KeyFallbackLayer::new(keys(1)));
    for i in 0..64 {
        let (_, reply, call) = reach(&mut svc, &mut handle, bucket(&format!("junk-{i}")))
            .await
            .unwrap();
        reply.send_response(response(200, &[], "{}"));
        call.await.unwrap().unwrap();
    }
    let (_, reply, call) = reach(&mut svc, &mut handle, bucket("llama")).await.unwrap();
    reply.send_response(response(429, &[("retry-after", "30")], GROQ_429));
    call.await.unwrap().unwrap_err();
    for req in [request(), bucket("gemma")] {
        match reach(&mut svc, &mut handle, req).await {
            Ok((_, reply, call)) => {
                reply.send_response(response(200, &[], "{}"));
                call.await.unwrap().unwrap();
            }
            Err(e) => panic!("llama's rate limit took the key from another bucket: {e}"),
        }
    }
}

/// 5: two keys, each spending only its own limit (every count goes down by one per own
/// request), are said to share a limit once our idea of a window (60 s without a reset
/// header) ends before the provider's.
#[tokio::test(start_paused = true)]
async fn own_traffic_is_not_a_shared_limit() {
    let warnings = Warnings::default();
    let layer = KeyFallbackLayer::builder(keys(2))
        .round_robin()
        .events(warnings.clone())
        .build();
    let (mut svc, mut handle, keys) = setup(layer);
    for (want, remaining) in [("gsk_key1", "99"), ("gsk_key2", "99")] {
        let (k, reply, call) = reach(&mut svc, &mut handle, request()).await.unwrap();
        assert_eq!(k, format!("Bearer {want}"));
        reply.send_response(ok("100", remaining, None));
        call.await.unwrap().unwrap();
    }
    tokio::time::advance(Duration::from_secs(61)).await;
    for (want, remaining) in [("gsk_key1", "98"), ("gsk_key2", "98")] {
        let (k, reply, call) = reach(&mut svc, &mut handle, request()).await.unwrap();
        assert_eq!(k, format!("Bearer {want}"));
        reply.send_response(ok("100", remaining, None));
        call.await.unwrap().unwrap();
    }
    assert!(
        warnings.0.lock().unwrap().is_empty(),
        "{:?}",
        warnings.0.lock().unwrap()
    );
    assert!(keys.status().shared_limits.is_empty());
}

/// Same, from a fresh process: a key used a little before the pool started.
#[tokio::test(start_paused = true)]
async fn earlier_use_of_a_key_is_not_a_shared_limit() {
    let warnings = Warnings::default();
    let layer = KeyFallbackLayer::builder(keys(2))
        .round_robin()
        .events(warnings.clone())
        .build();
    let (mut svc, mut handle, _) = setup(layer);
    for (want, remaining) in [("gsk_key1", "99"), ("gsk_key2", "97")] {
        let (k, reply, call) = reach(&mut svc, &mut handle, request()).await.unwrap();
        assert_eq!(k, format!("Bearer {want}"));
        reply.send_response(ok("100", remaining, Some("60s")));
        call.await.unwrap().unwrap();
    }
    assert!(
        warnings.0.lock().unwrap().is_empty(),
        "{:?}",
        warnings.0.lock().unwrap()
    );
}

/// Rotation makes a key active, but its lanes keep the old credential's bucket cooldowns.
#[tokio::test(start_paused = true)]
async fn a_rotated_key_is_not_held_by_the_old_credentials_bucket_cooldown() {
    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(keys(1)));
    let (_, reply, call) = reach(&mut svc, &mut handle, bucket("m")).await.unwrap();
    reply.send_response(response(429, &[("retry-after", "1800")], GROQ_429));
    call.await.unwrap().unwrap_err();
    keys.rotate("key-1", "gsk_new").unwrap();
    match reach(&mut svc, &mut handle, bucket("m")).await {
        Ok((k, _, _)) => assert_eq!(k, "Bearer gsk_new"),
        Err(e) => panic!("the new credential is passed over in bucket m: {e}"),
    }
}

/// "What they come to is not held against the new one": an answer of the old credential
/// that comes back after a rotation still writes the new one's budget.
#[tokio::test(start_paused = true)]
async fn an_old_credentials_late_answer_does_not_spend_the_new_one() {
    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(keys(1)));
    let (_, reply, call) = reach(&mut svc, &mut handle, bucket("m")).await.unwrap();
    keys.rotate("key-1", "gsk_new").unwrap();
    reply.send_response(ok("100", "0", Some("1h")));
    call.await.unwrap().unwrap();
    match reach(&mut svc, &mut handle, bucket("m")).await {
        Ok((k, _, _)) => assert_eq!(k, "Bearer gsk_new"),
        Err(e) => panic!("the old credential's answer holds the new one in bucket m: {e}"),
    }
}

/// A declared window started by a claim that is later released, with an earlier claim also
/// released, leaves `sent - 1` behind the window's reporter: the 32-bit `since` wraps and the
/// key reads as spent for the whole declared window, having sent nothing in it.
#[tokio::test(start_paused = true)]
async fn released_claims_do_not_spend_a_declared_window() {
    let layer = KeyFallbackLayer::builder(keys(2))
        .limits(tower_key_fallback::Limits::new().requests(2, Duration::from_secs(60)))
        .build();
    let (mut svc, mut handle, keys) = setup(layer);
    let mut waiting = Vec::new();
    for round in 0..2 {
        if round == 1 {
            tokio::time::advance(Duration::from_secs(61)).await;
        }
        // key1 fails; the replay claims key2 and waits in poll_ready.
        let (k, reply, call) = reach(&mut svc, &mut handle, request()).await.unwrap();
        assert_eq!(k, "Bearer gsk_key1");
        reply.send_response(response(500, &[], "{}"));
        settle().await;
        waiting.push(call);
    }
    for call in waiting {
        call.abort();
        let _ = call.await;
    }
    settle().await;
    let st = keys.status();
    let b = st.keys[1].buckets.first().cloned();
    assert!(
        b.as_ref().is_none_or(|b| b.passed_over_for.is_none()),
        "key2 sent nothing, yet: {b:?}"
    );
}
