//! What a hostile client or a broken upstream must not be able to do to the keys: stall a
//! request forever, blame a key with text the client wrote, set keys aside for decades,
//! land a revoked key's answer on its successor, or take every key out when the upstream
//! cannot be reached. Mocks on tokio's paused clock, and real sockets on 127.0.0.1.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_key_fallback::{
    BoxError, CooldownReason, Credential, Exhausted, KeyFallbackBody, KeyFallbackLayer, KeyHandle,
    KeyInUse, KeySet, KeyState,
};
use tower_test::mock;

mod support;
use support::{bearer, cooling, keys, request, response, state, Req, INVALID_401, QUOTA_429};

type Streamed = BoxBody<Bytes, BoxError>;
type SRes = Response<Streamed>;

/// Bounds every wait on the paused clock: auto-advance reaches it only when all is stuck.
const STUCK: Duration = Duration::from_secs(86_400 * 365);
/// Bounds every wait on real sockets.
const WAIT: Duration = Duration::from_secs(20);

fn setup_streamed(
    layer: KeyFallbackLayer,
) -> (
    tower_key_fallback::KeyFallback<mock::Mock<Req, SRes>>,
    mock::Handle<Req, SRes>,
    KeyHandle,
) {
    let (mock, handle) = mock::pair::<Req, SRes>();
    let keys = layer.handle();
    (layer.layer(mock), handle, keys)
}

/// A response that sends its head and `prefix`, then nothing, ever.
fn stalled(status: u16, headers: &[(&str, &str)], prefix: &'static [u8]) -> SRes {
    let frames =
        futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(Bytes::from_static(prefix)))])
            .chain(futures_util::stream::pending());
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(BodyExt::boxed(StreamBody::new(frames))).unwrap()
}

fn whole(res: support::Res) -> SRes {
    res.map(|b| b.map_err(|e: Infallible| match e {}).boxed())
}

async fn next<B>(
    handle: &mut mock::Handle<Request<B>, SRes>,
) -> (Request<B>, mock::SendResponse<SRes>) {
    tokio::time::timeout(STUCK, handle.next_request())
        .await
        .expect("an upstream call in time")
        .expect("the mock is alive")
}

// ---- 1. A stalled error body ----------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_stalled_429_body_moves_on_to_the_next_key_at_the_inspection_timeout() {
    let layer = KeyFallbackLayer::builder(keys(2)).build();
    let (mut svc, mut handle, keys) = setup_streamed(layer);
    handle.allow(2);
    svc.ready().await.unwrap();
    let start = tokio::time::Instant::now();
    let call = tokio::spawn(svc.call(request()));
    let (req, send) = next(&mut handle).await;
    assert_eq!(bearer(&req), "Bearer gsk_key1");
    send.send_response(stalled(429, &[("retry-after", "5")], b"{\"error\":{\"mess"));
    let (req, send) = next(&mut handle).await;
    assert_eq!(bearer(&req), "Bearer gsk_key2");
    // The default inspection bound is 5 s.
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    send.send_response(whole(response(200, &[], "{}")));
    let res = tokio::time::timeout(STUCK, call).await.unwrap().unwrap();
    assert_eq!(res.unwrap().status(), 200);
    // The head said 429 with retry-after: 5: a rate limit, for 5 s.
    assert_eq!(
        cooling(&keys, "key-1"),
        (Duration::from_secs(5), CooldownReason::RateLimited)
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_mid_read_still_records_what_the_head_said() {
    let layer = KeyFallbackLayer::builder(keys(2)).build();
    let (mut svc, mut handle, keys) = setup_streamed(layer);
    handle.allow(2);
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(request()));
    let (_, send) = next(&mut handle).await;
    send.send_response(stalled(429, &[("retry-after", "30")], b"{"));
    // Let the request start reading the body, then give up on it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    assert_eq!(cooling(&keys, "key-1").1, CooldownReason::RateLimited);
    // The next request does not go to the stalling key.
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(request()));
    let (req, send) = next(&mut handle).await;
    assert_eq!(bearer(&req), "Bearer gsk_key2");
    send.send_response(whole(response(200, &[], "{}")));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_body_handed_back_keeps_the_bytes_read() {
    let layer = KeyFallbackLayer::builder(keys(1))
        .body_inspect_timeout(Duration::from_secs(2))
        .build();
    let (mut svc, mut handle, _) = setup_streamed(layer);
    handle.allow(1);
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(request()));
    let (_, send) = next(&mut handle).await;
    send.send_response(stalled(403, &[], b"<html>blocked"));
    // A 403 that is not JSON is not the key's fault: handed back, with what was read.
    let res = tokio::time::timeout(STUCK, call)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), 403);
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"<html>blocked");
}

/// A raw HTTP/1.1 server on loopback: for each request, `answer` gets the request head and
/// gives the bytes to write (or nothing); the connection is then held for `hold` (a stall)
/// or closed.
async fn raw_server(answer: fn(&str) -> &'static [u8], hold: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for _ in 0..16 {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let head = read_head(&mut sock).await;
                let _ = sock.write_all(answer(&head)).await;
                tokio::time::sleep(hold).await;
            });
        }
    });
    addr
}

const OK_200: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";

/// The first key gets a 429 head and a few bytes, then nothing; every other key a 200.
async fn stalling_server() -> SocketAddr {
    raw_server(
        |head| {
            if head.contains("gsk_stall") {
                b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-type: application/json\r\ncontent-length: 300\r\n\r\n{\"error\":{"
            } else {
                OK_200
            }
        },
        WAIT * 2,
    )
    .await
}

async fn read_head(sock: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65_536 {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn over_http_a_stalled_body_is_bounded_even_with_a_timeout_inside_the_layer() {
    let addr = stalling_server().await;
    let keys = KeySet::new(["gsk_stall", "gsk_good"]).unwrap();
    let layer = KeyFallbackLayer::builder(keys)
        .body_inspect_timeout(Duration::from_millis(300))
        .build();
    let handle = layer.handle();
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    // The per-attempt timeout ends when the head arrives: it cannot bound the body.
    let svc = ServiceBuilder::new()
        .layer(layer)
        .timeout(Duration::from_secs(10))
        .service(client);
    let req = Request::post(format!("http://{addr}/openai/v1/chat/completions"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let res = tokio::time::timeout(WAIT, svc.oneshot(req))
        .await
        .expect("the request is not held by the stalled body")
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(cooling(&handle, "key-1").1, CooldownReason::RateLimited);
}

// ---- 2. What the client sends never changes a key's state --------------------------------

type Plain = tower_key_fallback::KeyFallback<mock::Mock<Req, support::Res>>;

/// Sends one request and answers its first upstream call; the request must then be done.
async fn one(
    svc: &mut Plain,
    handle: &mut support::MockHandle,
    answer: support::Res,
) -> Result<Response<KeyFallbackBody<Full<Bytes>>>, BoxError> {
    handle.allow(1);
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(request()));
    let (_, send) = support::next(handle).await;
    send.send_response(answer);
    tokio::time::timeout(STUCK, call)
        .await
        .expect("no second upstream call")
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn request_text_quoted_in_an_error_blames_no_key() {
    let cases: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/hostile-cases.json")).unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        if case["expect"] != "request_fault" {
            continue;
        }
        let (mut svc, mut handle, keys) = support::setup(KeyFallbackLayer::new(self::keys(3)));
        let status = case["status"].as_u64().unwrap() as u16;
        let body = case["body"].as_str().unwrap();
        let res = one(&mut svc, &mut handle, response(status, &[], body))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
        assert_eq!(res.status(), status, "{}", case["name"]);
        let got = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], body.as_bytes(), "{}", case["name"]);
        assert_eq!(keys.status().available(), 3, "{}", case["name"]);
    }
}

// ---- 3 and 4. A ceiling on every wait; a Retry-After date in the past -------------------

#[tokio::test(start_paused = true)]
async fn every_provider_wait_is_capped_and_the_status_says_so() {
    let day = Duration::from_secs(86_400);
    let (mut svc, mut handle, keys) = support::setup(KeyFallbackLayer::new(self::keys(2)));
    let answer = response(429, &[("retry-after", "999999999")], "{}");
    support::exchange(
        &mut svc,
        &mut handle,
        vec![("gsk_key1", answer), ("gsk_key2", response(200, &[], ""))],
    )
    .await
    .unwrap();
    assert_eq!(cooling(&keys, "key-1").0, day);
    assert!(keys.status().keys[0].cooldown_capped);
    assert!(!keys.status().keys[1].cooldown_capped);

    // A drained success with an absurd reset.
    let drained = response(
        200,
        &[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "99999999999h"),
        ],
        "{}",
    );
    let res = one(&mut svc, &mut handle, drained).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(cooling(&keys, "key-2"), (day, CooldownReason::Drained));
    assert!(keys.status().keys[1].cooldown_capped);

    // The cap is configurable; a wait under it is not capped.
    let layer = KeyFallbackLayer::builder(self::keys(2))
        .max_cooldown(Duration::from_secs(600))
        .build();
    let (mut svc, mut handle, keys) = support::setup(layer);
    for (wait, want, capped) in [("3600", 600, true), ("30", 30, false)] {
        keys.reset_all();
        support::exchange(
            &mut svc,
            &mut handle,
            vec![
                ("gsk_key1", response(429, &[("retry-after", wait)], "{}")),
                ("gsk_key2", response(200, &[], "")),
            ],
        )
        .await
        .unwrap();
        assert_eq!(cooling(&keys, "key-1").0, Duration::from_secs(want));
        assert_eq!(keys.status().keys[0].cooldown_capped, capped);
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_date_in_the_past_falls_back_to_the_configured_cooldown() {
    let (mut svc, mut handle, keys) = support::setup(KeyFallbackLayer::new(self::keys(2)));
    let past = response(
        429,
        &[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")],
        "{}",
    );
    support::exchange(
        &mut svc,
        &mut handle,
        vec![("gsk_key1", past), ("gsk_key2", response(200, &[], ""))],
    )
    .await
    .unwrap();
    assert_eq!(
        cooling(&keys, "key-1"),
        (Duration::from_secs(60), CooldownReason::RateLimited)
    );
}

// ---- 5. Rotation generations ------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_rotated_out_keys_answers_do_not_touch_its_successor() {
    for (answer, name) in [(INVALID_401, 401), (QUOTA_429, 429)] {
        let (mut svc, mut handle, keys) = support::setup(KeyFallbackLayer::new(self::keys(2)));
        handle.allow(3);
        svc.ready().await.unwrap();
        let call = tokio::spawn(svc.call(request()));
        let (req, send) = support::next(&mut handle).await;
        assert_eq!(bearer(&req), "Bearer gsk_key1");
        // The old key leaked: it is rotated out while this request is in flight.
        keys.rotate("key-1", "gsk_fresh").unwrap();
        send.send_response(response(name, &[], answer));
        let (req, send) = support::next(&mut handle).await;
        assert_eq!(bearer(&req), "Bearer gsk_key2");
        send.send_response(response(200, &[], ""));
        call.await.unwrap().unwrap();
        assert_eq!(state(&keys, "key-1"), KeyState::Active, "{name}");
        // The fresh key is used next.
        svc.ready().await.unwrap();
        let call = tokio::spawn(svc.call(request()));
        let (req, send) = support::next(&mut handle).await;
        assert_eq!(bearer(&req), "Bearer gsk_fresh");
        send.send_response(response(200, &[], ""));
        call.await.unwrap().unwrap();
    }
}

// ---- 6. Credential::None hands the key to the inner service ------------------------------

/// An inner service that signs each request itself with the key the pool chose.
#[derive(Clone)]
struct Sign<S>(S);

impl<S: Service<Req>> Service<Req> for Sign<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, mut req: Req) -> S::Future {
        let key = req
            .extensions()
            .get::<KeyInUse>()
            .expect("the key in use")
            .clone();
        let signature = format!("sig({}, {})", key.label(), key.secret());
        req.headers_mut()
            .insert("x-signature", signature.parse().unwrap());
        self.0.call(req)
    }
}

#[tokio::test(start_paused = true)]
async fn credential_none_hands_each_attempts_key_to_a_signing_inner_service() {
    let layer = KeyFallbackLayer::builder(keys(2))
        .credential(Credential::None)
        .build();
    let keys = layer.handle();
    let (mock, mut handle) = mock::pair::<Req, support::Res>();
    let mut svc = layer.layer(Sign(mock));
    handle.allow(2);
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(request()));
    let (req, send) = support::next(&mut handle).await;
    assert_eq!(req.headers()["x-signature"], "sig(key-1, gsk_key1)");
    // The caller's own credentials are gone.
    assert!(req.headers().get("authorization").is_none());
    assert!(req.headers().get("x-api-key").is_none());
    let key = req.extensions().get::<KeyInUse>().unwrap();
    assert_eq!(key.fingerprint(), keys.status().keys[0].fingerprint);
    assert!(!format!("{key:?}").contains("gsk_key1"));
    send.send_response(response(429, &[("retry-after", "9")], "{}"));
    let (req, send) = support::next(&mut handle).await;
    assert_eq!(req.headers()["x-signature"], "sig(key-2, gsk_key2)");
    send.send_response(response(200, &[], ""));
    call.await.unwrap().unwrap();
    // The pool cooled the key that was really sent.
    assert_eq!(
        cooling(&keys, "key-1"),
        (Duration::from_secs(9), CooldownReason::RateLimited)
    );
}

// ---- 11. An unreachable upstream is not the keys' fault --------------------------------

/// An address on loopback where nothing listens.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn chat(addr: SocketAddr) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/openai/v1/chat/completions"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

#[tokio::test]
async fn an_unreachable_upstream_blames_no_key_and_is_not_replayed() {
    let addr = closed_port().await;
    let layer = KeyFallbackLayer::new(KeySet::new(["gsk_a", "gsk_b", "gsk_c"]).unwrap());
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new().layer(layer).service(client());
    for _ in 0..4 {
        let err = tokio::time::timeout(WAIT, svc.ready().await.unwrap().call(chat(addr)))
            .await
            .unwrap()
            .unwrap_err();
        // The caller gets the transport error itself, not "every key is busy".
        assert!(err.downcast_ref::<Exhausted>().is_none(), "{err}");
        assert_eq!(err.to_string(), "client error (Connect)");
    }
    let keys = handle.status().keys;
    assert_eq!((keys[0].requests, keys[0].errors), (4, 0));
    assert_eq!(keys[1].requests + keys[2].requests, 0);
    assert!(keys.iter().all(|k| k.is_available()));

    // A proxy answers 502 naming the error, at once, with no Retry-After.
    let layer = KeyFallbackLayer::builder(KeySet::new(["gsk_a", "gsk_b"]).unwrap())
        .exhausted_response(true)
        .build();
    let svc = ServiceBuilder::new().layer(layer).service(client());
    let res = tokio::time::timeout(WAIT, svc.oneshot(chat(addr)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), 502);
    assert!(res.headers().get("retry-after").is_none());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.contains("client error (Connect)"), "{message}");
    assert!(message.contains("tcp connect error"), "{message}");
    assert!(!message.contains("gsk_"), "{message}");
}

/// A server that closes the connection without an answer for keys named `gsk_drop…`, and
/// answers 200 for every other.
async fn closing_server() -> SocketAddr {
    raw_server(
        |head| {
            if head.contains("gsk_drop") {
                b""
            } else {
                OK_200
            }
        },
        Duration::ZERO,
    )
    .await
}

#[tokio::test]
async fn a_lost_connection_blames_no_key_and_is_tried_once_more() {
    let addr = closing_server().await;
    let layer = KeyFallbackLayer::new(KeySet::new(["gsk_drop", "gsk_good"]).unwrap());
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(client());
    let res = tokio::time::timeout(WAIT, svc.oneshot(chat(addr)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), 200);
    let keys = handle.status().keys;
    assert_eq!((keys[0].requests, keys[0].errors), (1, 0));
    assert_eq!((keys[1].requests, keys[1].successes), (1, 1));

    // Tried once more, not key after key: with every key dropping, the error comes back
    // after two attempts.
    let keys = KeySet::new(["gsk_drop_1", "gsk_drop_2", "gsk_drop_3"]).unwrap();
    let layer = KeyFallbackLayer::new(keys);
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(client());
    let err = tokio::time::timeout(WAIT, svc.oneshot(chat(addr)))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.downcast_ref::<Exhausted>().is_none(), "{err}");
    let keys = handle.status().keys;
    let requests: Vec<u64> = keys.iter().map(|k| k.requests).collect();
    assert_eq!(requests, [1, 1, 0]);
    assert!(keys.iter().all(|k| k.errors == 0 && k.is_available()));
}
