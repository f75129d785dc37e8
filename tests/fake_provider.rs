//! The fake provider of `tower_key_fallback::testing`, each behaviour over real loopback HTTP
//! through hyper-util's client wrapped in the layer, and its own answers as Groq sends them.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_key_fallback::testing::{Behavior, FakeProvider, FakeServer};
use tower_key_fallback::{
    BoxError, CooldownReason, DisableReason, Exhausted, KeyFallback, KeyFallbackLayer, KeyHandle,
    KeySet, KeyState,
};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const CHAT: &str = "/openai/v1/chat/completions";
const MINUTE: Duration = Duration::from_secs(60);

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn chat(server: &FakeServer, stream: bool) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"llama-3.1-8b-instant","messages":[{{"role":"user","content":"hi"}}],"stream":{stream}}}"#
    );
    Request::post(server.url(CHAT))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// The layer over hyper-util's client, with these keys (labelled key-1, key-2, …).
fn layered(keys: &[&str]) -> (KeyFallback<HttpClient>, KeyHandle) {
    let layer = KeyFallbackLayer::new(KeySet::new(keys).unwrap());
    let handle = layer.handle();
    (
        ServiceBuilder::new().layer(layer).service(http_client()),
        handle,
    )
}

/// One call straight to the server, with `key` (or none), without the layer.
async fn direct(server: &FakeServer, key: Option<&str>) -> Response<Incoming> {
    let mut req = chat(server, false);
    if let Some(key) = key {
        req.headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    http_client().request(req).await.unwrap()
}

async fn text<B>(res: Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn header<B>(res: &Response<B>, name: &str) -> Option<String> {
    res.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

fn cooling(handle: &KeyHandle, label: &str) -> Option<(Duration, CooldownReason)> {
    match handle.status().get(label).unwrap().state {
        KeyState::CoolingDown { remaining, reason } => Some((remaining, reason)),
        _ => None,
    }
}

#[tokio::test]
async fn rate_limited_key_answers_like_groq_and_the_next_key_serves() {
    let provider = FakeProvider::builder()
        .key(
            "gsk_small",
            Behavior::RateLimited {
                requests: 2,
                window: MINUTE,
            },
        )
        .key("gsk_big", Behavior::Ok)
        .build();
    let server = provider.serve_ephemeral().await.unwrap();

    // Spend the small key's window straight at the server, reading its headers.
    let first = direct(&server, Some("gsk_small")).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-ratelimit-limit-requests").unwrap(), "2");
    assert_eq!(
        header(&first, "x-ratelimit-remaining-requests").unwrap(),
        "1"
    );
    let reset = header(&first, "x-ratelimit-reset-requests").unwrap();
    assert!(reset.starts_with("59.") || reset == "1m0s", "{reset}");
    for name in ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens"] {
        assert!(
            header(&first, name).unwrap().parse::<u64>().is_ok(),
            "{name}"
        );
    }
    assert!(header(&first, "x-ratelimit-reset-tokens")
        .unwrap()
        .ends_with('s'));
    assert!(header(&first, "retry-after").is_none());
    let body = text(first).await;
    assert!(body.contains(r#""object":"chat.completion""#), "{body}");
    assert!(body.contains(r#""model":"llama-3.1-8b-instant""#), "{body}");

    let second = direct(&server, Some("gsk_small")).await;
    assert_eq!(
        header(&second, "x-ratelimit-remaining-requests").unwrap(),
        "0"
    );

    let refused = direct(&server, Some("gsk_small")).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = header(&refused, "retry-after").unwrap().parse().unwrap();
    assert!((59..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(
        header(&refused, "x-ratelimit-remaining-requests").unwrap(),
        "0"
    );
    assert_eq!(
        header(&refused, "content-type").unwrap(),
        "application/json"
    );
    let body = text(refused).await;
    assert!(body.starts_with(r#"{"error":{"message":"Rate limit reached for model `llama-3.1-8b-instant` in organization `org_"#), "{body}");
    assert!(body.contains("service tier `on_demand` on requests per minute (RPM): Limit 2, Used 2, Requested 1. Please try again in 59."), "{body}");
    assert!(
        body.ends_with(r#"","type":"requests","code":"rate_limit_exceeded"}}"#),
        "{body}"
    );

    // Through the layer: the small key is refused, the request is replayed with the big one.
    let (svc, handle) = layered(&["gsk_small", "gsk_big"]);
    let res = svc.oneshot(chat(&server, false)).await.unwrap();
    assert_eq!(res.status(), 200);
    text(res).await;

    let (left, reason) = cooling(&handle, "key-1").expect("key-1 cooling");
    assert_eq!(reason, CooldownReason::RateLimited);
    assert!(left > Duration::from_secs(55) && left <= MINUTE, "{left:?}");
    let status = handle.status();
    assert_eq!(status.keys[0].rate_limited, 1);
    assert_eq!(status.keys[1].successes, 1);

    let stats = provider.stats();
    assert_eq!(stats.key("gsk_small").served, 2);
    assert_eq!(stats.key("gsk_small").rate_limited, 2);
    assert_eq!(stats.key("gsk_big").served, 1);
    assert_eq!(stats.total().requests, 5);
}

#[tokio::test]
async fn a_drained_key_is_set_aside_before_it_gets_a_429() {
    let provider = FakeProvider::builder()
        .key(
            "gsk_a",
            Behavior::RateLimited {
                requests: 3,
                window: MINUTE,
            },
        )
        .key("gsk_b", Behavior::Ok)
        .build();
    let server = provider.serve_ephemeral().await.unwrap();
    let (mut svc, handle) = layered(&["gsk_a", "gsk_b"]);

    for _ in 0..5 {
        let res = svc.ready().await.unwrap().call(chat(&server, false)).await;
        let res = res.unwrap();
        assert_eq!(res.status(), 200);
        text(res).await;
    }
    let stats = provider.stats();
    assert_eq!(stats.key("gsk_a").served, 3);
    assert_eq!(stats.key("gsk_a").rate_limited, 0, "no 429 was spent");
    assert_eq!(stats.key("gsk_b").served, 2);
    let (_, reason) = cooling(&handle, "key-1").expect("key-1 cooling");
    assert_eq!(reason, CooldownReason::Drained);
}

#[tokio::test]
async fn the_window_ends_and_the_key_comes_back() {
    let window = Duration::from_millis(600);
    let provider = FakeProvider::builder()
        .key(
            "gsk_a",
            Behavior::RateLimited {
                requests: 1,
                window,
            },
        )
        .key("gsk_b", Behavior::Ok)
        .build();
    let server = provider.serve_ephemeral().await.unwrap();
    let (mut svc, handle) = layered(&["gsk_a", "gsk_b"]);

    for _ in 0..2 {
        let res = svc.ready().await.unwrap().call(chat(&server, false)).await;
        text(res.unwrap()).await;
    }
    assert!(cooling(&handle, "key-1").is_some());
    tokio::time::sleep(window + Duration::from_millis(100)).await;
    let res = svc.ready().await.unwrap().call(chat(&server, false)).await;
    text(res.unwrap()).await;

    let stats = provider.stats();
    assert_eq!(stats.key("gsk_a").served, 2);
    assert_eq!(stats.key("gsk_b").served, 1);
    assert_eq!(stats.total().rate_limited, 0);
}

#[tokio::test]
async fn an_exhausted_quota_cools_the_key_for_long() {
    let provider = FakeProvider::builder()
        .key("sk-broke", Behavior::QuotaExhausted)
        .key("sk-paid", Behavior::Ok)
        .build();
    let server = provider.serve_ephemeral().await.unwrap();

    let refused = direct(&server, Some("sk-broke")).await;
    assert_eq!(refused.status(), 429);
    assert!(header(&refused, "retry-after").is_none());
    assert_eq!(
        text(refused).await,
        r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#
    );

    let (svc, handle) = layered(&["sk-broke", "sk-paid"]);
    let res = svc.oneshot(chat(&server, false)).await.unwrap();
    assert_eq!(res.status(), 200);
    text(res).await;
    let (left, reason) = cooling(&handle, "key-1").expect("key-1 cooling");
    assert_eq!(reason, CooldownReason::QuotaExhausted);
    assert!(left > Duration::from_secs(50 * 60), "{left:?}");
    assert_eq!(provider.stats().key("sk-broke").quota_exhausted, 2);
}

#[tokio::test]
async fn invalid_and_unknown_keys_get_401_and_are_disabled() {
    let provider = FakeProvider::builder()
        .key("gsk_revoked", Behavior::InvalidKey)
        .key("gsk_good", Behavior::Ok)
        .build();
    let server = provider.serve_ephemeral().await.unwrap();

    let groq_401 = r#"{"error":{"message":"Invalid API Key","type":"invalid_request_error","code":"invalid_api_key"}}"#;
    for key in [Some("gsk_revoked"), Some("gsk_never_issued"), None] {
        let res = direct(&server, key).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{key:?}");
        assert!(header(&res, "x-ratelimit-limit-requests").is_none());
        assert_eq!(text(res).await, groq_401);
    }

    let (svc, handle) = layered(&["gsk_revoked", "gsk_never_issued", "gsk_good"]);
    let res = svc.oneshot(chat(&server, false)).await.unwrap();
    assert_eq!(res.status(), 200);
    text(res).await;
    let status = handle.status();
    for label in ["key-1", "key-2"] {
        assert_eq!(
            status.get(label).unwrap().state,
            KeyState::Disabled {
                reason: DisableReason::InvalidKey
            },
            "{label}"
        );
    }
    let stats = provider.stats();
    assert_eq!(stats.key("gsk_revoked").unauthorized, 2);
    assert_eq!(stats.key("gsk_never_issued").unauthorized, 2);
    assert_eq!(stats.key("").unauthorized, 1);
    assert_eq!(stats.key("gsk_good").served, 1);
}

#[tokio::test]
async fn an_outage_counts_errors_until_the_key_is_set_aside() {
    let provider = FakeProvider::builder()
        .key("gsk_down", Behavior::Outage)
        .key("gsk_up", Behavior::Ok)
        .build();
    let server = provider.serve_ephemeral().await.unwrap();

    let res = direct(&server, Some("gsk_down")).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(text(res).await.contains(r#""code":"server_is_overloaded""#));

    let layer = KeyFallbackLayer::builder(KeySet::new(["gsk_down", "gsk_up"]).unwrap())
        .error_threshold(2)
        .build();
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new().layer(layer).service(http_client());
    for round in 1..=2 {
        let res = svc.ready().await.unwrap().call(chat(&server, false)).await;
        let res = res.unwrap();
        assert_eq!(res.status(), 200, "round {round}");
        text(res).await;
    }
    let (_, reason) = cooling(&handle, "key-1").expect("set aside after 2 errors");
    assert_eq!(reason, CooldownReason::Errors);
    assert_eq!(provider.stats().key("gsk_down").unavailable, 3);

    // The outage ends; once the key is reset the layer uses it again.
    provider.set_behavior("gsk_down", Behavior::Ok);
    handle.reset("key-1").unwrap();
    let res = svc.ready().await.unwrap().call(chat(&server, false)).await;
    text(res.unwrap()).await;
    assert_eq!(provider.stats().key("gsk_down").served, 1);
}

#[tokio::test]
async fn a_slow_key_times_out_and_the_next_key_serves() {
    let provider = FakeProvider::builder()
        .key("gsk_slow", Behavior::Slow(Duration::from_secs(5)))
        .key("gsk_fast", Behavior::Ok)
        .build();
    let server = provider.serve_ephemeral().await.unwrap();
    let layer = KeyFallbackLayer::new(KeySet::new(["gsk_slow", "gsk_fast"]).unwrap());
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .timeout(Duration::from_millis(200))
        .service(http_client());

    let started = std::time::Instant::now();
    let res = svc.oneshot(chat(&server, false)).await.unwrap();
    assert_eq!(res.status(), 200);
    text(res).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let status = handle.status();
    assert_eq!(status.keys[0].errors, 1);
    assert_eq!(status.keys[1].successes, 1);
    let stats = provider.stats();
    assert_eq!(stats.key("gsk_slow").requests, 1);
    assert_eq!(stats.key("gsk_fast").served, 1);
}

#[tokio::test]
async fn a_stream_passes_through_one_event_per_frame() {
    let provider = FakeProvider::builder()
        .key(
            "gsk_none_left",
            Behavior::RateLimited {
                requests: 0,
                window: MINUTE,
            },
        )
        .key("gsk_b", Behavior::Ok)
        .stream_interval(Duration::from_millis(20))
        .build();
    let server = provider.serve_ephemeral().await.unwrap();
    let (svc, _handle) = layered(&["gsk_none_left", "gsk_b"]);

    let res = svc.oneshot(chat(&server, true)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "content-type").unwrap(), "text/event-stream");
    assert!(header(&res, "content-length").is_none());
    let mut body = res.into_body();
    let mut frames = Vec::new();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            arrivals.push(std::time::Instant::now());
            frames.push(String::from_utf8(data.to_vec()).unwrap());
        }
    }
    // A role event, one per word, a last one with the usage, and [DONE]: each its own frame.
    assert_eq!(frames.len(), 9, "{frames:#?}");
    for frame in &frames {
        assert!(
            frame.starts_with("data: ") && frame.ends_with("\n\n"),
            "{frame:?}"
        );
        assert_eq!(frame.matches("data: ").count(), 1, "{frame:?}");
    }
    assert!(frames[0].contains(r#""delta":{"role":"assistant","content":""}"#));
    assert!(frames[1].contains(r#""object":"chat.completion.chunk""#));
    let words: String = frames[1..7]
        .iter()
        .map(|f| {
            f.split(r#""content":""#)
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(words, "Hello from the fake provider.");
    assert!(frames[7].contains(r#""finish_reason":"stop""#) && frames[7].contains(r#""usage""#));
    assert_eq!(frames[8], "data: [DONE]\n\n");
    // Sent 20 ms apart (160 ms first to last), they arrive spread out, not in one piece
    // at the end; the margin allows for a stalled test thread.
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(spread >= Duration::from_millis(100), "{spread:?}");

    let stats = provider.stats();
    assert_eq!(stats.key("gsk_none_left").rate_limited, 1);
    assert_eq!(stats.key("gsk_b").streamed, 1);
}

#[tokio::test]
async fn when_every_key_is_refused_the_error_says_how_long_to_wait() {
    let none_left = Behavior::RateLimited {
        requests: 0,
        window: Duration::from_secs(30),
    };
    let provider = FakeProvider::builder()
        .key("gsk_a", none_left.clone())
        .key("gsk_b", none_left)
        .build();
    let server = provider.serve_ephemeral().await.unwrap();
    let (svc, _handle) = layered(&["gsk_a", "gsk_b"]);

    let err: BoxError = svc.oneshot(chat(&server, false)).await.unwrap_err();
    let mut exhausted = err.downcast::<Exhausted>().expect("Exhausted");
    assert_eq!(exhausted.attempts(), 2);
    assert_eq!(exhausted.last_status(), Some(StatusCode::TOO_MANY_REQUESTS));
    let wait = exhausted.retry_after().unwrap();
    assert!(
        wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
        "{wait:?}"
    );
    let last = exhausted.take_last_response().unwrap();
    assert!(text(last).await.contains("rate_limit_exceeded"));
    assert_eq!(provider.stats().total().rate_limited, 2);
}

#[tokio::test]
async fn a_wrong_path_is_the_request_fault_not_the_key() {
    let provider = FakeProvider::builder().key("gsk_a", Behavior::Ok).build();
    let server = provider.serve_ephemeral().await.unwrap();
    let (svc, handle) = layered(&["gsk_a"]);
    let req = Request::post(server.url("/openai/v1/chat/completion"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert!(text(res).await.contains(r#""code":"unknown_url""#));
    assert!(handle.status().keys[0].is_available());
    assert_eq!(provider.stats().key("gsk_a").not_found, 1);
}

#[tokio::test]
async fn the_layer_counts_what_the_server_counts() {
    let provider = FakeProvider::builder()
        .key(
            "gsk_1",
            Behavior::RateLimited {
                requests: 4,
                window: MINUTE,
            },
        )
        .key("gsk_2", Behavior::QuotaExhausted)
        .key(
            "gsk_3",
            Behavior::RateLimited {
                requests: 10,
                window: MINUTE,
            },
        )
        .key("gsk_4", Behavior::Outage)
        .key("gsk_5", Behavior::Ok)
        .build();
    let server = provider.serve_ephemeral().await.unwrap();
    let (svc, handle) = layered(&["gsk_1", "gsk_2", "gsk_3", "gsk_4", "gsk_5"]);

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..30 {
        let (svc, req) = (svc.clone(), chat(&server, false));
        tasks.spawn(async move {
            let res = svc.oneshot(req).await.unwrap();
            assert_eq!(res.status(), 200);
            text(res).await;
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }

    let status = handle.status();
    let stats = provider.stats();
    for (key, label) in ["gsk_1", "gsk_2", "gsk_3", "gsk_4", "gsk_5"]
        .iter()
        .zip(["key-1", "key-2", "key-3", "key-4", "key-5"])
    {
        let ours = status.get(label).unwrap();
        let theirs = stats.key(key);
        assert_eq!(ours.requests, theirs.requests, "{key}");
        assert_eq!(ours.successes, theirs.served, "{key}");
        assert_eq!(
            ours.rate_limited,
            theirs.rate_limited + theirs.quota_exhausted,
            "{key}"
        );
    }
    assert_eq!(stats.total().served, 30);
    assert!(stats.key("gsk_1").served <= 4 && stats.key("gsk_3").served <= 10);
}

#[tokio::test]
async fn the_server_stops_on_shutdown_and_on_drop() {
    let provider = FakeProvider::builder().key("gsk_a", Behavior::Ok).build();

    // A port the caller picks.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = provider
        .serve(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    assert_eq!(server.addr().port(), port);
    assert_eq!(direct(&server, Some("gsk_a")).await.status(), 200);
    let addr = server.addr();
    let open = tokio::net::TcpStream::connect(addr).await.unwrap();
    server.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    closes_soon(open).await;

    let server = provider.serve_ephemeral().await.unwrap();
    let addr = server.addr();
    let open = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_eq!(direct(&server, Some("gsk_a")).await.status(), 200);
    drop(server);
    closes_soon(open).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// Waits (at most a second) for the server to close a connection it had open.
async fn closes_soon(stream: tokio::net::TcpStream) {
    let closed = tokio::time::timeout(Duration::from_secs(1), async {
        let mut buf = [0u8; 64];
        loop {
            if stream.readable().await.is_err() {
                return;
            }
            match stream.try_read(&mut buf) {
                Ok(0) => return,
                Ok(n) => panic!("the server sent {n} bytes unasked"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection stayed open");
}

#[tokio::test(start_paused = true)]
async fn windows_and_delays_follow_a_paused_clock() {
    let provider = FakeProvider::builder()
        .key(
            "gsk_a",
            Behavior::RateLimited {
                requests: 2,
                window: Duration::from_secs(10),
            },
        )
        .key("gsk_slow", Behavior::Slow(Duration::from_secs(30)))
        .build();
    let call = |key: &str| {
        let req = Request::post("http://fake/openai/v1/chat/completions")
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        provider.clone().oneshot(req)
    };
    assert_eq!(call("gsk_a").await.unwrap().status(), 200);
    tokio::time::advance(Duration::from_secs(4)).await;
    assert_eq!(call("gsk_a").await.unwrap().status(), 200);
    let refused = call("gsk_a").await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "retry-after").unwrap(), "6");
    assert_eq!(
        header(&refused, "x-ratelimit-reset-requests").unwrap(),
        "6s"
    );
    tokio::time::advance(Duration::from_secs(6)).await;
    let again = call("gsk_a").await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(
        header(&again, "x-ratelimit-remaining-requests").unwrap(),
        "1"
    );
    assert_eq!(header(&again, "x-ratelimit-reset-requests").unwrap(), "10s");

    let started = tokio::time::Instant::now();
    assert_eq!(call("gsk_slow").await.unwrap().status(), 200);
    assert_eq!(started.elapsed(), Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn an_understated_retry_after_ends_before_the_window_does() {
    let provider = FakeProvider::builder()
        .key(
            "gsk_a",
            Behavior::RateLimited {
                requests: 1,
                window: Duration::from_secs(10),
            },
        )
        .understate_retry_after(Duration::from_millis(2500))
        .build();
    let call = || {
        let req = Request::post("http://fake/openai/v1/chat/completions")
            .header("authorization", "Bearer gsk_a")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        provider.clone().oneshot(req)
    };
    let served = call().await.unwrap();
    assert_eq!(served.status(), 200);
    // 10 s left in the window, 7.5 s announced.
    assert_eq!(
        header(&served, "x-ratelimit-reset-requests").unwrap(),
        "7.5s"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    let refused = call().await.unwrap();
    assert_eq!(refused.status(), 429);
    // 9 s left; 6.5 s announced, and retry-after rounds that up.
    assert_eq!(
        header(&refused, "x-ratelimit-reset-requests").unwrap(),
        "6.5s"
    );
    assert_eq!(header(&refused, "retry-after").unwrap(), "7");
    assert!(text(refused).await.contains("Please try again in 6.5s."));
    // Coming back when told is too early: the window has 2 s left, and says 0.
    tokio::time::advance(Duration::from_secs(7)).await;
    let early = call().await.unwrap();
    assert_eq!(early.status(), 429);
    assert_eq!(header(&early, "x-ratelimit-reset-requests").unwrap(), "0s");
    assert_eq!(header(&early, "retry-after").unwrap(), "1");
    // At the real end the key serves again.
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(call().await.unwrap().status(), 200);
    assert_eq!(provider.stats().key("gsk_a").rate_limited, 2);
}
