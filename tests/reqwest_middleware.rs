//! End to end: `reqwest_middleware::ClientBuilder` with [`KeyFallbackMiddleware`], against a
//! real hyper server on 127.0.0.1 that answers like Groq and OpenAI do.
#![cfg(feature = "reqwest-middleware")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower_key_fallback::{
    Credential, DisableReason, KeyFallbackLayer, KeyFallbackMiddleware, KeySet, KeyState,
};

type Body = BoxBody<Bytes, Infallible>;

const GROQ_429: &str = r#"{"error":{"message":"Rate limit reached for model `llama-3.1-8b-instant` in organization `org_01` service tier `on_demand` on tokens per minute (TPM): Limit 6000, Used 5980, Requested 120. Please try again in 1.2s. Visit https://console.groq.com/docs/rate-limits for more information.","type":"tokens","code":"rate_limit_exceeded"}}"#;
const OPENAI_QUOTA: &str = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
const GROQ_401: &str = r#"{"error":{"message":"Invalid API Key","type":"invalid_request_error","code":"invalid_api_key"}}"#;
const OK_BODY: &str = r#"{"choices":[{"message":{"role":"assistant","content":"hi"}}]}"#;

/// How the fake upstream treats one key; unknown keys get 401.
#[derive(Clone)]
enum Mode {
    Ok,
    /// Groq's 429 with `retry-after: 60`.
    RateLimited,
    /// OpenAI's 429 `insufficient_quota`.
    Quota,
    /// Serves this many requests, then answers like `RateLimited`.
    Budget(u64),
    /// Never answers.
    Hang,
    /// Answers 400 with a body of this many bytes.
    BigError(usize),
    /// Streams SSE: one event, then the rest once notified.
    Sse(Arc<Notify>),
    /// Answers `307 Temporary Redirect` to this URL.
    Redirect(String),
}

/// What the upstream saw.
#[derive(Default)]
struct Seen {
    /// Per key, in the order of arrival: the `Authorization` value, or "" when none.
    authorizations: Vec<String>,
    /// `x-api-key` values, which must never arrive: the caller's credential is removed.
    other_credentials: Vec<String>,
    /// Request bodies, to check replays are byte for byte.
    bodies: Vec<Bytes>,
    counts: HashMap<String, u64>,
}

struct Upstream {
    modes: HashMap<String, Mode>,
    seen: Mutex<Seen>,
    total: AtomicU64,
}

impl Upstream {
    fn count(&self, key: &str) -> u64 {
        self.seen
            .lock()
            .unwrap()
            .counts
            .get(key)
            .copied()
            .unwrap_or(0)
    }
    fn authorizations(&self) -> Vec<String> {
        self.seen.lock().unwrap().authorizations.clone()
    }
}

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).boxed()
}

fn answer(status: u16, headers: &[(&str, &str)], body: Body) -> Response<Body> {
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-request-id", "req_01jngbvsctfy0bmjw87yea904b");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body).unwrap()
}

async fn handle(up: Arc<Upstream>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let other: Vec<String> = req
        .headers()
        .get_all("x-api-key")
        .iter()
        .map(|v| v.to_str().unwrap_or("?").to_owned())
        .collect();
    // The key: a bearer token, else an `x-api-key`.
    let key = match auth.strip_prefix("Bearer ") {
        Some(key) => key.to_owned(),
        None => other.first().cloned().unwrap_or_default(),
    };
    let body = req.into_body().collect().await.unwrap().to_bytes();
    up.total.fetch_add(1, Ordering::SeqCst);
    let n = {
        let mut seen = up.seen.lock().unwrap();
        seen.authorizations.push(auth);
        seen.other_credentials.extend(other);
        seen.bodies.push(body);
        let c = seen.counts.entry(key.clone()).or_default();
        *c += 1;
        *c
    };
    let limited = || {
        answer(
            429,
            &[
                ("retry-after", "60"),
                ("x-ratelimit-remaining-tokens", "20"),
            ],
            full(GROQ_429),
        )
    };
    let res = match up.modes.get(&key).cloned() {
        None => answer(401, &[], full(GROQ_401)),
        Some(Mode::Ok) => answer(200, &[], full(OK_BODY)),
        Some(Mode::RateLimited) => limited(),
        Some(Mode::Budget(max)) if n > max => limited(),
        Some(Mode::Budget(_)) => answer(200, &[], full(OK_BODY)),
        Some(Mode::Quota) => answer(429, &[], full(OPENAI_QUOTA)),
        Some(Mode::Hang) => std::future::pending().await,
        Some(Mode::BigError(n)) => answer(400, &[], full(vec![b'e'; n])),
        Some(Mode::Redirect(to)) => answer(307, &[("location", &to)], full("")),
        Some(Mode::Sse(release)) => {
            let mut res = answer(200, &[], StreamBody::new(sse(release)).boxed());
            res.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            res
        }
    };
    Ok(res)
}

/// SSE frames: the first at once, the others after `release`.
fn sse(
    release: Arc<Notify>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let _ = tx
            .send(Bytes::from_static(
                b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            ))
            .await;
        release.notified().await;
        let _ = tx
            .send(Bytes::from_static(
                b"data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
            ))
            .await;
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
    })
}

/// Starts the upstream on 127.0.0.1, port 0.
async fn serve(modes: &[(&str, Mode)]) -> (SocketAddr, Arc<Upstream>) {
    let up = Arc::new(Upstream {
        modes: modes
            .iter()
            .map(|(k, m)| (k.to_string(), m.clone()))
            .collect(),
        seen: Mutex::default(),
        total: AtomicU64::new(0),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shared = up.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let up = shared.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(up.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, up)
}

fn keys(names: &[&str]) -> KeySet {
    KeySet::new(names).unwrap()
}

/// A client with the middleware; no proxy from the environment, so loopback stays loopback.
fn client_with(layer: &KeyFallbackLayer, reqwest: reqwest::ClientBuilder) -> ClientWithMiddleware {
    // The dev-dependencies build reqwest with rustls and no crypto provider (for
    // examples/groq.rs); a client cannot be built before one is installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let reqwest = reqwest.no_proxy().build().unwrap();
    ClientBuilder::new(reqwest)
        .with(KeyFallbackMiddleware::new(layer))
        .build()
}

fn client(layer: &KeyFallbackLayer) -> ClientWithMiddleware {
    client_with(layer, reqwest::Client::builder())
}

const CHAT: &str =
    r#"{"model":"llama-3.1-8b-instant","messages":[{"role":"user","content":"hi"}]}"#;

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/openai/v1/chat/completions")
}

async fn chat(
    client: &ClientWithMiddleware,
    addr: SocketAddr,
) -> reqwest_middleware::Result<reqwest::Response> {
    client
        .post(url(addr))
        .header("content-type", "application/json")
        .header("authorization", "Bearer caller-set")
        .header("x-api-key", "caller-set")
        .body(CHAT)
        .send()
        .await
}

#[tokio::test]
async fn a_rate_limited_key_falls_over_to_the_next() {
    let (addr, up) = serve(&[("k1", Mode::RateLimited), ("k2", Mode::Ok)]).await;
    let layer = KeyFallbackLayer::new(keys(&["k1", "k2"]));
    let handle = layer.handle();
    let client = client(&layer);

    let res = chat(&client, addr).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), OK_BODY);

    // The key's credential replaced the caller's, and the body was replayed byte for byte.
    assert_eq!(up.authorizations(), ["Bearer k1", "Bearer k2"]);
    {
        let seen = up.seen.lock().unwrap();
        assert!(
            seen.other_credentials.is_empty(),
            "{:?}",
            seen.other_credentials
        );
        assert!(seen.bodies.iter().all(|b| b == CHAT));
    }
    let s = handle.status();
    assert_eq!(s.keys[0].requests, up.count("k1"));
    assert_eq!(s.keys[1].requests, up.count("k2"));
    assert_eq!((s.keys[0].rate_limited, s.keys[0].successes), (1, 0));
    assert_eq!(s.keys[1].successes, 1);
    assert!(
        matches!(s.keys[0].state, KeyState::CoolingDown { remaining, .. } if remaining > Duration::from_secs(55)),
        "{:?}",
        s.keys[0].state
    );

    // Key 1 is cooling: the next request goes straight to key 2.
    let res = chat(&client, addr).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(up.authorizations(), ["Bearer k1", "Bearer k2", "Bearer k2"]);
    // The middleware's handle is the layer's.
    let via_middleware = KeyFallbackMiddleware::new(&layer).handle().status();
    assert_eq!(via_middleware.keys[1].requests, 2);
}

#[tokio::test]
async fn an_invalid_key_is_disabled_and_skipped() {
    let (addr, up) = serve(&[("k_ok", Mode::Ok)]).await;
    let layer = KeyFallbackLayer::new(keys(&["k_dead", "k_ok"]));
    let handle = layer.handle();
    let client = client(&layer);
    for _ in 0..3 {
        let res = chat(&client, addr).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(up.count("k_dead"), 1);
    assert_eq!(up.count("k_ok"), 3);
    let s = handle.status();
    assert_eq!(
        s.keys[0].state,
        KeyState::Disabled {
            reason: DisableReason::InvalidKey
        }
    );
    assert_eq!((s.keys[0].requests, s.keys[1].requests), (1, 3));
}

#[tokio::test]
async fn a_one_mib_error_body_comes_back_whole() {
    const MIB: usize = 1 << 20;
    let (addr, up) = serve(&[("k_big", Mode::BigError(MIB))]).await;
    // A small inspection limit: most of the body is still unread when it is classified.
    let layer = KeyFallbackLayer::builder(keys(&["k_big", "k_other"]))
        .body_inspect_limit(4096)
        .build();
    let handle = layer.handle();
    let res = chat(&client(&layer), addr).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(res.version(), http::Version::HTTP_11);
    assert_eq!(res.url().as_str(), url(addr));
    assert_eq!(
        res.headers()["x-request-id"],
        "req_01jngbvsctfy0bmjw87yea904b"
    );
    assert_eq!(res.content_length(), Some(MIB as u64));
    let body = res.bytes().await.unwrap();
    assert_eq!(body.len(), MIB);
    assert!(body.iter().all(|b| *b == b'e'));
    // A 400 is the request's fault: no key blamed, no replay.
    assert_eq!(up.total.load(Ordering::SeqCst), 1);
    assert_eq!(handle.status().keys[1].requests, 0);
    assert_eq!(handle.status().available(), 2);
}

#[tokio::test]
async fn exhaustion_gives_a_downcastable_exhausted_with_the_last_response() {
    let (addr, up) = serve(&[("k1", Mode::RateLimited), ("k2", Mode::Quota)]).await;
    let layer = KeyFallbackLayer::new(keys(&["k1", "k2"]));
    let client = client(&layer);

    let err = chat(&client, addr).await.unwrap_err();
    let exhausted = KeyFallbackMiddleware::exhausted(&err).expect("an Exhausted error");
    assert_eq!(exhausted.attempts(), 2);
    assert_eq!(exhausted.last_status(), Some(StatusCode::TOO_MANY_REQUESTS));
    let wait = exhausted.retry_after().unwrap();
    assert!(
        wait > Duration::from_secs(55) && wait <= Duration::from_secs(60),
        "{wait:?}"
    );
    // The plain anyhow route finds it too.
    match &err {
        reqwest_middleware::Error::Middleware(e) => {
            assert!(e.is::<tower_key_fallback::Exhausted>())
        }
        other => panic!("{other:?}"),
    }
    let mut exhausted = KeyFallbackMiddleware::into_exhausted(err).unwrap();
    let last = exhausted.take_last_response().unwrap();
    assert_eq!(
        last.into_body().collect().await.unwrap().to_bytes(),
        OPENAI_QUOTA
    );
    assert_eq!(up.total.load(Ordering::SeqCst), 2);

    // Now no key is usable: nothing is sent.
    let err = chat(&client, addr).await.unwrap_err();
    assert_eq!(
        KeyFallbackMiddleware::exhausted(&err).unwrap().attempts(),
        0
    );
    assert_eq!(up.total.load(Ordering::SeqCst), 2);
    // Other errors are not taken for it.
    let other = reqwest_middleware::Error::Middleware(anyhow::anyhow!("boom"));
    assert!(KeyFallbackMiddleware::exhausted(&other).is_none());
    assert!(KeyFallbackMiddleware::into_exhausted(other).is_err());
}

#[tokio::test]
async fn exhausted_response_answers_429_with_retry_after() {
    let (addr, up) = serve(&[("k1", Mode::RateLimited)]).await;
    let layer = KeyFallbackLayer::builder(keys(&["k1"]))
        .exhausted_response(true)
        .build();
    let res = chat(&client(&layer), addr).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.url().as_str(), url(addr));
    let secs: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((56..=60).contains(&secs), "{secs}");
    let body = res.text().await.unwrap();
    assert!(body.contains("\"code\":\"keys_exhausted\""), "{body}");
    assert_eq!(up.total.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn exhausted_response_answers_502_when_the_upstream_cannot_be_reached() {
    let (addr, _up) = serve(&[("k_hang", Mode::Hang)]).await;
    let layer = KeyFallbackLayer::builder(keys(&["k_hang"]))
        .exhausted_response(true)
        .build();
    let client = client_with(
        &layer,
        reqwest::Client::builder().timeout(Duration::from_millis(300)),
    );
    let res = chat(&client, addr).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert!(res.headers().get("retry-after").is_none());
    let body = res.text().await.unwrap();
    assert!(body.contains("\"code\":\"upstream_unreachable\""), "{body}");
}

#[tokio::test]
async fn a_transport_error_counts_against_the_key_and_moves_on() {
    let (addr, up) = serve(&[("k_hang", Mode::Hang), ("k_ok", Mode::Ok)]).await;
    let layer = KeyFallbackLayer::new(keys(&["k_hang", "k_ok"]));
    let handle = layer.handle();
    // reqwest's timeout is per `execute`, so per attempt.
    let client = client_with(
        &layer,
        reqwest::Client::builder().timeout(Duration::from_millis(300)),
    );
    let res = chat(&client, addr).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(up.authorizations(), ["Bearer k_hang", "Bearer k_ok"]);
    let s = handle.status();
    assert_eq!((s.keys[0].errors, s.keys[0].consecutive_errors), (1, 1));
    assert_eq!(s.keys[1].successes, 1);
}

#[tokio::test]
async fn transport_errors_can_be_handed_back_at_once() {
    let (addr, up) = serve(&[("k_hang", Mode::Hang), ("k_ok", Mode::Ok)]).await;
    let layer = KeyFallbackLayer::builder(keys(&["k_hang", "k_ok"]))
        .fallback_on_transport_errors(false)
        .build();
    let client = client_with(
        &layer,
        reqwest::Client::builder().timeout(Duration::from_millis(300)),
    );
    let err = chat(&client, addr).await.unwrap_err();
    match &err {
        reqwest_middleware::Error::Reqwest(e) => assert!(e.is_timeout(), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(up.count("k_ok"), 0);
}

#[tokio::test]
async fn exhaustion_after_transport_errors_keeps_the_last_error() {
    let (addr, _) = serve(&[("k1", Mode::Hang), ("k2", Mode::Hang)]).await;
    let layer = KeyFallbackLayer::new(keys(&["k1", "k2"]));
    let client = client_with(
        &layer,
        reqwest::Client::builder().timeout(Duration::from_millis(200)),
    );
    let err = chat(&client, addr).await.unwrap_err();
    let exhausted = KeyFallbackMiddleware::exhausted(&err).unwrap();
    assert_eq!(exhausted.attempts(), 2);
    assert_eq!(exhausted.last_status(), None);
    let source = std::error::Error::source(exhausted).expect("the last error");
    let source = source
        .downcast_ref::<reqwest_middleware::Error>()
        .expect("the client's error");
    assert!(matches!(source, reqwest_middleware::Error::Reqwest(e) if e.is_timeout()));
}

#[tokio::test]
async fn a_streaming_request_body_is_sent_once() {
    let (addr, up) = serve(&[("k1", Mode::RateLimited), ("k2", Mode::Ok)]).await;
    let layer = KeyFallbackLayer::new(keys(&["k1", "k2"]));
    let handle = layer.handle();
    let body = reqwest::Body::wrap(Full::new(Bytes::from_static(CHAT.as_bytes())));
    let res = client(&layer)
        .post(url(addr))
        .body(body)
        .send()
        .await
        .unwrap();
    // The 429 is handed back whole: the body could not be copied for key 2.
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "60");
    assert_eq!(res.text().await.unwrap(), GROQ_429);
    assert_eq!(up.authorizations(), ["Bearer k1"]);
    // The verdict is still recorded: key 1 cools down.
    assert!(!handle.status().keys[0].is_available());
}

#[tokio::test]
async fn sse_streams_pass_through_unbuffered() {
    let release = Arc::new(Notify::new());
    let (addr, _) = serve(&[
        ("k_rate", Mode::RateLimited),
        ("k_sse", Mode::Sse(release.clone())),
    ])
    .await;
    let layer = KeyFallbackLayer::new(keys(&["k_rate", "k_sse"]));
    let mut res = chat(&client(&layer), addr).await.unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    // The first event arrives while the server still holds the rest back.
    let first = tokio::time::timeout(Duration::from_secs(10), res.chunk())
        .await
        .expect("first event before the stream ends")
        .unwrap()
        .unwrap();
    assert!(first.starts_with(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}"));
    release.notify_one();
    let rest = res.bytes().await.unwrap();
    assert!(rest.ends_with(b"data: [DONE]\n\n"), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_over_keys_running_out_match_the_server_counts() {
    let (addr, up) = serve(&[
        ("k1", Mode::Budget(15)),
        ("k2", Mode::Budget(25)),
        ("k3", Mode::Ok),
    ])
    .await;
    // Probing off: at start every key is half-open, and with probing the burst goes to
    // whichever key's first answer comes back first, which the scheduler decides (a slow
    // first answer from k1 sent everything to k2 and k3 on a loaded CI machine). This test
    // is about counting under concurrency, so every request may take k1 until it refuses.
    let layer = KeyFallbackLayer::builder(keys(&["k1", "k2", "k3"]))
        .probe_wait(Duration::ZERO)
        .build();
    let handle = layer.handle();
    let client = client(&layer);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let client = client.clone();
        tasks.spawn(async move {
            let res = chat(&client, addr).await?;
            let status = res.status();
            res.bytes().await?;
            Ok::<_, reqwest_middleware::Error>(status)
        });
    }
    let statuses = tokio::time::timeout(Duration::from_secs(60), async {
        let mut all = Vec::new();
        while let Some(r) = tasks.join_next().await {
            all.push(r.unwrap().unwrap());
        }
        all
    })
    .await
    .expect("all requests finish in time");
    assert_eq!(statuses.len(), 100);
    assert!(statuses.iter().all(|s| *s == 200));
    let s = handle.status();
    for (k, name) in s.keys.iter().zip(["k1", "k2", "k3"]) {
        assert_eq!(k.requests, up.count(name), "{}", k.label);
    }
    let served: u64 = s.keys.iter().map(|k| k.successes).sum();
    assert_eq!(served, 100);
    assert_eq!((s.keys[0].successes, s.keys[1].successes), (15, 25));
    assert!(!s.keys[0].is_available() && !s.keys[1].is_available());
}

#[tokio::test]
async fn a_redirect_to_another_origin_never_carries_the_bearer_key() {
    // The other origin: another port on 127.0.0.1. It serves any request.
    let (other, other_up) = serve(&[("", Mode::Ok), ("k1", Mode::Ok), ("k2", Mode::Ok)]).await;
    let target = format!("http://{other}/elsewhere");
    let (addr, up) = serve(&[("k1", Mode::Redirect(target.clone()))]).await;

    // reqwest follows the redirect beneath the middleware and drops `Authorization`.
    let layer = KeyFallbackLayer::new(keys(&["k1", "k2"]));
    let res = chat(&client(&layer), addr).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.url().as_str(), target);
    assert_eq!(up.authorizations(), ["Bearer k1"]);
    assert_eq!(other_up.authorizations(), [""]);

    // A key in another header is not dropped by reqwest: such a client must not follow
    // redirects, and then the 3xx comes back as it is.
    let layer = KeyFallbackLayer::builder(keys(&["k1", "k2"]))
        .credential(Credential::Header(http::HeaderName::from_static(
            "x-api-key",
        )))
        .build();
    let res = chat(&client(&layer), addr).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(other_up.seen.lock().unwrap().other_credentials, ["k1"]);
    let no_redirects = client_with(
        &layer,
        reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()),
    );
    let res = chat(&no_redirects, addr).await.unwrap();
    assert_eq!(res.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(res.headers()["location"], target.as_str());
    assert_eq!(other_up.total.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_unreachable_upstream_blames_no_key_and_comes_back_as_the_connect_error() {
    // Nothing listens at this loopback address.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let layer = KeyFallbackLayer::new(keys(&["k1", "k2"]));
    let handle = layer.handle();
    let client = client(&layer);
    for _ in 0..4 {
        let err = chat(&client, addr).await.unwrap_err();
        assert!(KeyFallbackMiddleware::exhausted(&err).is_none(), "{err}");
        match &err {
            reqwest_middleware::Error::Reqwest(e) => assert!(e.is_connect(), "{e}"),
            other => panic!("{other:?}"),
        }
    }
    let s = handle.status();
    assert_eq!((s.keys[0].requests, s.keys[0].errors), (4, 0));
    assert_eq!(s.keys[1].requests, 0);
    assert_eq!(s.available(), 2);
}

/// A `Bucket` given as a middleware extension scopes a rate limit to that bucket, as on the
/// tower path: the key limited for one model is tried first for another.
#[tokio::test]
async fn a_bucket_extension_scopes_the_rate_limit() {
    let (addr, up) = serve(&[("k1", Mode::RateLimited), ("k2", Mode::Ok)]).await;
    let layer = KeyFallbackLayer::new(keys(&["k1", "k2"]));
    let handle = layer.handle();
    let client = client(&layer);
    let send = |bucket: &'static str| {
        client
            .post(url(addr))
            .header("content-type", "application/json")
            .with_extension(tower_key_fallback::Bucket::new(bucket))
            .body(CHAT)
            .send()
    };
    assert_eq!(send("busy").await.unwrap().status(), 200);
    assert_eq!(send("busy").await.unwrap().status(), 200);
    assert_eq!(send("quiet").await.unwrap().status(), 200);
    // busy: k1's 429, then k2; busy again: straight to k2; quiet: k1 first (its limit is
    // busy's), then k2.
    assert_eq!(
        up.authorizations(),
        [
            "Bearer k1",
            "Bearer k2",
            "Bearer k2",
            "Bearer k1",
            "Bearer k2"
        ]
    );
    let s = handle.status();
    assert_eq!(s.keys[0].state, KeyState::Active);
    let busy = s.keys[0]
        .buckets
        .iter()
        .find(|b| b.bucket.as_deref() == Some("busy"))
        .unwrap();
    assert!(busy
        .passed_over_for
        .is_some_and(|d| d > Duration::from_secs(55)));
}

#[tokio::test]
async fn a_request_waits_for_a_key_and_a_replay_waits_too() {
    let (addr, up) = serve(&[("k1", Mode::RateLimited), ("k2", Mode::Ok)]).await;
    let layer = KeyFallbackLayer::builder(keys(&["k1", "k2"]))
        .wait_for_key(Duration::from_secs(5))
        .build();
    let handle = layer.handle();
    let client = client(&layer);
    let label = |i: usize| handle.status().keys[i].label.clone();
    // Key 2 is set aside for 300 ms; key 1 answers 429 (for 60 s): the replay waits for
    // key 2 instead of failing.
    handle
        .cool_down(&label(1), Duration::from_millis(300))
        .unwrap();
    let start = std::time::Instant::now();
    let res = chat(&client, addr).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(up.authorizations(), ["Bearer k1", "Bearer k2"]);
    // Both set aside, key 2 for 300 ms more: a new request waits before it is sent.
    handle
        .cool_down(&label(1), Duration::from_millis(300))
        .unwrap();
    let start = std::time::Instant::now();
    let res = chat(&client, addr).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(up.authorizations(), ["Bearer k1", "Bearer k2", "Bearer k2"]);
    assert_eq!(handle.status().waiting, 0);
}
