//! The gateway example over real loopback HTTP: a hyper-util client (with no key of its own)
//! talks to the gateway, which forwards through the layer to the fake Groq API.
//!
//! The example's own code is compiled into this test with `#[path]`, so `gateway::app` is
//! tested in process, servers and client on 127.0.0.1 with ports the system picks; two more
//! tests run the built example binary as the README says to, against a fake provider.
//!
//! The protections (allowed hosts, cross-site refusal, the admin token, path safety, head and
//! body timeouts) are tested with requests written by hand on a raw TCP socket where a
//! client library would tidy them up: what an attacker can send.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};


use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::time::timeout;
use tower_key_fallback::testing::{Behavior, FakeProvider, FakeServer};
use tower_key_fallback::{KeyFallbackLayer, KeySet};

// The example itself (its `main` and command line are unused here, hence the allow): the
// test drives the very router the binary serves. Running the binary instead for every case
// would hide failures behind a child process; one test below does run it.
#[allow(dead_code)]
#[path = "../examples/gateway.rs"]
mod gateway;

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(10);
/// The gateway's body cap in these tests.
const CAP: usize = 16 * 1024;
const CHAT: &str = "/openai/v1/chat/completions";

type ClientBody = BoxBody<Bytes, Infallible>;

struct Setup {
    provider: FakeProvider,
    _upstream: FakeServer,
    gateway: SocketAddr,
    client: Client<HttpConnector, ClientBody>,
}

/// The gateway's settings in these tests: the defaults with the test's body cap.
fn settings() -> gateway::Settings {
    gateway::Settings {
        max_body: CAP,
        ..gateway::Settings::default()
    }
}

/// The fake provider with `keys` (variable, key, behaviour) on 127.0.0.1:0, the gateway in
/// front of it on 127.0.0.1:0 with keys from those variables.
async fn start(keys: &[(&str, &str, Behavior)]) -> Setup {
    start_with(keys, &settings()).await
}

/// [`start`] with other settings.
async fn start_with(keys: &[(&str, &str, Behavior)], settings: &gateway::Settings) -> Setup {
    let mut builder = FakeProvider::builder().stream_interval(Duration::from_millis(60));
    for (_, key, behavior) in keys {
        builder = builder.key(*key, behavior.clone());
    }
    let provider = builder.build();
    let upstream = provider.serve_ephemeral().await.unwrap();
    let vars = keys.iter().map(|(var, key, _)| (*var, *key));
    let layer = KeyFallbackLayer::new(KeySet::from_vars("GROQ_API_KEY", vars).unwrap());
    let base = gateway::parse_upstream(&upstream.url("")).unwrap();
    let gateway = serve_with(gateway::app(base, layer, settings), settings).await;
    Setup {
        provider,
        _upstream: upstream,
        gateway,
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

/// Serves the router with `gateway::serve` on 127.0.0.1:0 for the rest of the test.
async fn serve_with(app: axum::Router, settings: &gateway::Settings) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let settings = settings.clone();
    tokio::spawn(
        async move { gateway::serve(listener, app, &settings, std::future::pending()).await },
    );
    addr
}

/// [`serve_with`] the test settings.
async fn serve(app: axum::Router) -> SocketAddr {
    serve_with(app, &settings()).await
}

fn full(body: impl Into<Bytes>) -> ClientBody {
    Full::new(body.into()).boxed()
}

fn chat_body(stream: bool) -> String {
    format!(
        r#"{{"model":"llama-3.1-8b-instant","messages":[{{"role":"user","content":"hi"}}],"stream":{stream}}}"#
    )
}

impl Setup {
    async fn send(&self, method: &str, path: &str, body: ClientBody) -> Response<Incoming> {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.gateway))
            .header("content-type", "application/json")
            // The client's own credential: the layer must replace it with a pool key.
            .header("authorization", "Bearer sk-client-own-token")
            .body(body)
            .unwrap();
        timeout(WAIT, self.client.request(req))
            .await
            .expect("the gateway answers in time")
            .expect("the gateway answers")
    }

    /// Sends and reads the whole answer.
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: ClientBody,
    ) -> (StatusCode, HeaderMap, String) {
        let res = self.send(method, path, body).await;
        let (head, body) = res.into_parts();
        let bytes = timeout(WAIT, body.collect())
            .await
            .expect("the body ends in time")
            .expect("the body is read")
            .to_bytes();
        (
            head.status,
            head.headers,
            String::from_utf8(bytes.to_vec()).unwrap(),
        )
    }

    async fn chat(&self) -> (StatusCode, HeaderMap, String) {
        self.call("POST", CHAT, full(chat_body(false))).await
    }

    async fn json(&self, method: &str, path: &str) -> (StatusCode, Value) {
        let (status, headers, text) = self.call(method, path, full("")).await;
        assert_eq!(headers["content-type"], "application/json", "{text}");
        (status, serde_json::from_str(&text).expect(&text))
    }

    /// `GET /keys`, checked to hold no key and to count what the provider saw, per key.
    async fn keys(&self, secrets: &[&str]) -> Value {
        let (status, headers, text) = self.call("GET", "/keys", full("")).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(headers["content-type"], "application/json");
        for secret in secrets {
            assert!(!text.contains(secret), "a key in the status: {text}");
        }
        let value: Value = serde_json::from_str(&text).unwrap();
        let stats = self.provider.stats();
        for (i, secret) in secrets.iter().enumerate() {
            assert_eq!(
                value["keys"][i]["requests"].as_u64(),
                Some(stats.key(secret).requests),
                "layer and provider disagree on key {i}: {text}"
            );
        }
        value
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_falls_back_streams_caps_and_reports() {
    let limited = "gsk_gateway_test_limited";
    let ok = "gsk_gateway_test_ok";
    let setup = start(&[
        (
            "GROQ_API_KEY",
            limited,
            Behavior::RateLimited {
                requests: 0,
                window: Duration::from_secs(30),
            },
        ),
        ("GROQ_API_KEY_2", ok, Behavior::Ok),
    ])
    .await;

    // A chat completion: key 1 is refused with a 429, key 2 serves it.
    let (status, headers, body) = setup.chat().await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with(r#"{"id":"chatcmpl-"#), "{body}");
    assert_eq!(headers["content-type"], "application/json");
    // The provider's own headers come through; hop-by-hop ones do not.
    assert_eq!(headers["x-ratelimit-limit-requests"], "14400");
    assert!(headers.contains_key("x-request-id"));
    let stats = setup.provider.stats();
    assert_eq!(stats.key(limited).rate_limited, 1);
    assert_eq!(stats.key(ok).served, 1);
    // The client's own token never reached the provider, and nothing else did.
    assert_eq!(stats.key("sk-client-own-token").requests, 0);
    assert_eq!(stats.total().requests, 2);

    // A streamed completion comes back event by event, not all at the end.
    let res = setup.send("POST", CHAT, full(chat_body(true))).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.into_body();
    let mut frames: Vec<(Instant, Bytes)> = Vec::new();
    for _ in 0..100 {
        match timeout(WAIT, body.frame()).await.expect("an event in time") {
            Some(frame) => {
                if let Ok(data) = frame.unwrap().into_data() {
                    frames.push((Instant::now(), data));
                }
            }
            None => break,
        }
    }
    let all: Vec<u8> = frames.iter().flat_map(|(_, d)| d.to_vec()).collect();
    let all = String::from_utf8(all).unwrap();
    assert_eq!(all.matches("data: ").count(), 9, "{all}");
    assert!(all.ends_with("data: [DONE]\n\n"), "{all}");
    assert!(frames.len() >= 3, "{} frames: {all}", frames.len());
    assert!(!frames[0].1.windows(6).any(|w| w == b"[DONE]"));
    // The provider waits 60 ms between its 9 events: the first reached the client about
    // half a second before the last, so nothing held the stream back.
    let spread = frames.last().unwrap().0 - frames[0].0;
    assert!(spread >= Duration::from_millis(240), "{spread:?}");
    assert_eq!(setup.provider.stats().key(ok).streamed, 1);

    // Method, path and query go upstream as they came: the fake answers its own 404 for
    // anything but chat completions, naming what it was asked.
    let (status, _, body) = setup
        .call("GET", "/openai/v1/models?limit=1", full(""))
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("Unknown request URL: GET /openai/v1/models."),
        "{body}"
    );

    // Bodies past the cap get a 413 and never reach the provider: one with a length, one
    // streamed in chunks with none. A body of exactly the cap is forwarded.
    let before = setup.provider.stats().total().requests;
    let (status, _, body) = setup.call("POST", CHAT, full(vec![b' '; CAP + 1])).await;
    assert_eq!(status, 413, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], "request_too_large");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    let chunks = (0..4).map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b' '; CAP / 2]))));
    let streamed = StreamBody::new(futures_util::stream::iter(chunks)).boxed();
    let (status, _, body) = setup.call("POST", CHAT, streamed).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(setup.provider.stats().total().requests, before);
    let mut exact = chat_body(false).into_bytes();
    exact.resize(CAP, b' ');
    let (status, _, body) = setup.call("POST", CHAT, full(exact)).await;
    assert_eq!(status, 200, "{body}");

    // The status: key 1 cooling for its rate limit, key 2 serving, counts as the provider
    // saw them.
    let keys = setup.keys(&[limited, ok]).await;
    assert_eq!(keys["available"], 1, "{keys}");
    let first = &keys["keys"][0];
    assert_eq!(first["label"], "GROQ_API_KEY");
    assert_eq!(first["state"], "cooling_down");
    assert_eq!(first["reason"], "rate_limited");
    let remaining = first["remaining_ms"].as_u64().unwrap();
    assert!(remaining > 0 && remaining <= 30_000, "{remaining}");
    assert_eq!(first["requests"], 1);
    assert_eq!(first["rate_limited"], 1);
    assert_eq!(first["available"], false);
    assert!(first["fingerprint"].as_str().unwrap().starts_with("fp:"));
    let second = &keys["keys"][1];
    assert_eq!(second["label"], "GROQ_API_KEY_2");
    assert_eq!(second["state"], "active");
    assert_eq!(second["reason"], Value::Null);
    assert_eq!(second["requests"], 4);
    assert_eq!(second["errors"], 0);

    // Reset: every key active again, and the answer is the new status.
    let (status, reset) = setup.json("POST", "/keys/reset").await;
    assert_eq!(status, 200);
    assert_eq!(reset["available"], 2, "{reset}");
    assert!(reset["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["state"] == "active"));
    assert_eq!(setup.keys(&[limited, ok]).await["available"], 2);

    // One key by label; an unknown label is a 404 that does not echo what was asked.
    let (status, one) = setup.json("POST", "/keys/GROQ_API_KEY_2/reset").await;
    assert_eq!(status, 200);
    assert_eq!(one["available"], 2);
    let (status, unknown) = setup.json("POST", "/keys/gsk_not_a_label/reset").await;
    assert_eq!(status, 404);
    assert_eq!(unknown["error"]["code"], "unknown_key");
    assert!(!unknown.to_string().contains("gsk_not_a_label"));

    // Anything else is an OpenAI-style 404 from the gateway itself.
    let (status, other) = setup.json("POST", "/v1/chat/completions").await;
    assert_eq!(status, 404);
    assert_eq!(other["error"]["code"], "unknown_url");
    assert!(other["error"]["message"]
        .as_str()
        .unwrap()
        .contains("The gateway serves"));
    let (status, _, _) = setup.call("GET", "/keys/reset", full("")).await;
    assert_eq!(status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_keys_exhausted_is_a_429_with_retry_after() {
    let (one, two) = ("gsk_gateway_test_one", "gsk_gateway_test_two");
    let window = || Behavior::RateLimited {
        requests: 1,
        window: Duration::from_secs(30),
    };
    let setup = start(&[
        ("GROQ_API_KEY", one, window()),
        ("GROQ_API_KEY_2", two, window()),
    ])
    .await;

    // Each key serves one request and says it has none left; the third finds no key and
    // costs no upstream call.
    for _ in 0..2 {
        let (status, _, body) = setup.chat().await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, headers, body) = setup.chat().await;
    assert_eq!(status, 429, "{body}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!(headers["content-type"], "application/json");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], "keys_exhausted");
    assert_eq!(error["error"]["type"], "rate_limit_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("Retry after {retry} seconds")),
        "{body}"
    );
    assert_eq!(setup.provider.stats().total().requests, 2);

    let keys = setup.keys(&[one, two]).await;
    assert_eq!(keys["available"], 0, "{keys}");
    for key in keys["keys"].as_array().unwrap() {
        assert_eq!(key["state"], "cooling_down", "{keys}");
        assert_eq!(key["reason"], "limit_reached", "{keys}");
        assert_eq!(key["successes"], 1, "{keys}");
    }

    // After a reset the keys are tried again; the provider still refuses both (their
    // windows have not ended), so the answer is again a 429, now after two upstream 429s.
    let (_, reset) = setup.json("POST", "/keys/reset").await;
    assert_eq!(reset["available"], 2);
    let (status, headers, body) = setup.chat().await;
    assert_eq!(status, 429, "{body}");
    assert!(headers.contains_key("retry-after"));
    let stats = setup.provider.stats();
    assert_eq!(stats.key(one).rate_limited, 1);
    assert_eq!(stats.key(two).rate_limited, 1);
    let keys = setup.keys(&[one, two]).await;
    for key in keys["keys"].as_array().unwrap() {
        assert_eq!(key["reason"], "rate_limited", "{keys}");
        assert_eq!(key["rate_limited"], 1, "{keys}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_a_502() {
    // A port that was free a moment ago: nothing listens there.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let keys = KeySet::from_vars(
        "GROQ_API_KEY",
        [
            ("GROQ_API_KEY", "gsk_unreachable_a"),
            ("GROQ_API_KEY_2", "gsk_unreachable_b"),
        ],
    )
    .unwrap();
    let layer = KeyFallbackLayer::new(keys);
    let handle = layer.handle();
    let base = gateway::parse_upstream(&format!("http://{closed}")).unwrap();
    let addr = serve(gateway::app(base, layer, &settings())).await;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://{addr}{CHAT}"))
        .body(Full::new(Bytes::from(chat_body(false))))
        .unwrap();
    let res = timeout(WAIT, client.request(req)).await.unwrap().unwrap();
    assert_eq!(res.status(), 502);
    let body = timeout(WAIT, res.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains("gsk_unreachable"), "{text}");
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["code"], "upstream_unreachable", "{text}");
    // Both keys were tried, and each got one error (not enough to set it aside).
    for key in handle.status().keys {
        assert_eq!((key.requests, key.errors), (1, 1), "{key:?}");
        assert!(key.is_available());
    }
}

/// The request lines an upstream received, in order.
type Seen = Arc<Mutex<Vec<String>>>;

/// An upstream that answers with what it received: the request line, then each header; it
/// keeps each request line in the log it returns.
async fn echo_upstream() -> (SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let line = format!("{} {}", req.method(), req.uri());
                    log.lock().unwrap().push(line.clone());
                    async move {
                        let mut text = format!("{line}\n");
                        for (name, value) in req.headers() {
                            text.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("?")));
                        }
                        let res = Response::builder()
                            .header("content-type", "text/plain")
                            .header("keep-alive", "timeout=5")
                            .header("x-upstream", "yes")
                            .body(Full::new(Bytes::from(text)))
                            .unwrap();
                        Ok::<_, Infallible>(res)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_goes_upstream_and_what_comes_back() {
    let (upstream, _) = echo_upstream().await;
    let layer = KeyFallbackLayer::new(KeySet::new(["gsk_echo_key"]).unwrap());
    let base = gateway::parse_upstream(&format!("http://{upstream}")).unwrap();
    let addr = serve(gateway::app(base, layer, &settings())).await;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://{addr}/openai/v1/embeddings?x=1&y=two"))
        .header("authorization", "Bearer sk-client-own-token")
        .header("x-api-key", "sk-client-other-token")
        .header("accept-encoding", "gzip, br")
        .header("connection", "x-per-hop")
        .header("x-per-hop", "1")
        .header("te", "trailers")
        .header("x-custom", "a")
        .header("x-custom", "b")
        .header("openai-organization", "org-123")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"input\":\"hi\"}")))
        .unwrap();
    let res = timeout(WAIT, client.request(req)).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-upstream"], "yes");
    assert!(
        !res.headers().contains_key("keep-alive"),
        "{:?}",
        res.headers()
    );
    let body = timeout(WAIT, res.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    let seen = String::from_utf8(body.to_vec()).unwrap();
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines[0], "POST /openai/v1/embeddings?x=1&y=two", "{seen}");
    let has = |line: &str| lines.contains(&line);
    // The pool's key replaces every credential the client sent.
    assert!(has("authorization: Bearer gsk_echo_key"), "{seen}");
    assert!(!seen.contains("sk-client"), "{seen}");
    // End-to-end headers pass, all their values; hop-by-hop ones and encodings do not.
    assert!(has("x-custom: a") && has("x-custom: b"), "{seen}");
    assert!(has("openai-organization: org-123"), "{seen}");
    assert!(has("content-type: application/json"), "{seen}");
    assert!(has(&format!("host: {upstream}")), "{seen}");
    assert!(has("content-length: 14"), "{seen}");
    for gone in [
        "accept-encoding",
        "x-per-hop",
        "te:",
        "connection: x-per-hop",
    ] {
        assert!(!seen.contains(gone), "{gone} went upstream: {seen}");
    }
}

#[test]
fn upstream_urls_and_the_command_line() {
    let base = gateway::parse_upstream("http://127.0.0.1:9000").unwrap();
    assert_eq!(
        gateway::upstream_uri(&base, "/openai/v1/models?limit=1").unwrap(),
        "http://127.0.0.1:9000/openai/v1/models?limit=1"
    );
    let prefixed = gateway::parse_upstream("http://proxy.local:8080/groq/").unwrap();
    assert_eq!(
        gateway::upstream_uri(&prefixed, "/openai/v1/chat/completions").unwrap(),
        "http://proxy.local:8080/groq/openai/v1/chat/completions"
    );
    let https = gateway::parse_upstream("https://api.groq.com").unwrap_err();
    assert!(
        https.contains("plain HTTP") && https.contains("TLS"),
        "{https}"
    );
    assert!(gateway::parse_upstream("api.groq.com").is_err());
    assert!(gateway::parse_upstream("http://h/?a=1").is_err());

    let parse = |args: &[&str], env: &[(&str, &str)]| {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        gateway::Command::parse(args.iter().map(|a| a.to_string()), move |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    };
    let run = |c: Result<gateway::Command, String>| match c {
        Ok(gateway::Command::Run(config)) => config,
        other => panic!("{other:?}"),
    };
    let config = run(parse(&[], &[("UPSTREAM_URL", "http://127.0.0.1:9000")]));
    assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(config.keys_env, "GROQ_API_KEY");
    assert_eq!(config.max_body, gateway::DEFAULT_MAX_BODY);
    assert!(!config.fake);
    let config = run(parse(
        &[
            "--listen",
            "127.0.0.1:0",
            "--keys-env=OPENAI_API_KEY",
            "--max-body",
            "100",
        ],
        &[
            ("UPSTREAM_URL", "http://a:1"),
            ("GATEWAY_LISTEN", "127.0.0.1:9"),
        ],
    ));
    assert_eq!(config.listen.port(), 0);
    assert_eq!(config.keys_env, "OPENAI_API_KEY");
    assert_eq!(config.max_body, 100);
    assert_eq!(config.upstream.unwrap(), "http://a:1/");
    let config = run(parse(&["--fake"], &[]));
    assert!(config.fake && config.upstream.is_none());

    let missing = parse(&[], &[]).unwrap_err();
    assert!(missing.contains("UPSTREAM_URL"), "{missing}");
    assert!(parse(&["--max-body", "0"], &[("UPSTREAM_URL", "http://a")]).is_err());
    assert!(parse(&["--listen"], &[]).is_err());
    assert!(parse(&["--bogus"], &[]).is_err());
    assert!(matches!(
        parse(&["--help"], &[]),
        Ok(gateway::Command::Help)
    ));
}

/// The example binary, built next to the test binaries.
fn gateway_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let bin = profile_dir
        .join("examples")
        .join(format!("gateway{}", std::env::consts::EXE_SUFFIX));
    // `cargo test` builds the examples, `cargo test --test gateway` does not: make sure the
    // binary is there and up to date (a no-op when it is), in this test's profile.
    let mut build = std::process::Command::new(env!("CARGO"));
    build
        .args(["build", "--example", "gateway"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().unwrap();
    assert!(status.success(), "cargo build --example gateway: {status}");
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

/// A running gateway binary, killed when dropped.
struct Running {
    child: Child,
    addr: SocketAddr,
    banner: String,
    stderr: Arc<Mutex<String>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary and waits (bounded) for the line with the address it listens on.
fn launch(mut command: Command) -> Running {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // The logs, kept for a failure message; read as they come so the pipe never fills.
    let stderr = Arc::new(Mutex::new(String::new()));
    let (pipe, log) = (child.stderr.take().unwrap(), stderr.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { return };
            let mut log = log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut running = Running {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        banner: String::new(),
        stderr,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        running.banner.push_str(&line);
        running.banner.push('\n');
        if let Some(rest) = line.split("listening on http://").nth(1) {
            let addr = rest.split_whitespace().next().unwrap();
            running.addr = addr.parse().unwrap();
            return running;
        }
    }
    let _ = running.child.kill();
    let _ = running.child.wait();
    std::thread::sleep(Duration::from_millis(100));
    panic!(
        "the gateway did not say where it listens:\n{}\n{}",
        running.banner,
        running.stderr.lock().unwrap()
    );
}

async fn post_chat(addr: SocketAddr) -> (StatusCode, String) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://{addr}{CHAT}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat_body(false))))
        .unwrap();
    let res = timeout(WAIT, client.request(req)).await.unwrap().unwrap();
    let status = res.status();
    let body = timeout(WAIT, res.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn get_keys(addr: SocketAddr) -> Value {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = Request::get(format!("http://{addr}/keys"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = timeout(WAIT, client.request(req)).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    let body = timeout(WAIT, res.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_as_the_readme_says() {
    let bin = gateway_binary();
    let provider = FakeProvider::builder()
        .key("gsk_binary_test_revoked", Behavior::InvalidKey)
        .key("gsk_binary_test_good", Behavior::Ok)
        .build();
    let upstream = provider.serve_ephemeral().await.unwrap();

    // UPSTREAM_URL and the keys from the environment, as in the README (another prefix
    // than GROQ_API_KEY, so that keys in the environment running the tests stay out).
    let mut command = Command::new(&bin);
    command
        .args(["--listen", "127.0.0.1:0", "--keys-env", "GATEWAY_TEST_KEY"])
        .env("UPSTREAM_URL", upstream.url(""))
        .env("GATEWAY_TEST_KEY", "gsk_binary_test_revoked")
        .env("GATEWAY_TEST_KEY_2", "gsk_binary_test_good")
        .env_remove("GATEWAY_LISTEN");
    let running = launch(command);
    assert!(
        running.banner.contains(&format!(
            "forwarding /openai/v1/* to {} with 2 keys: GATEWAY_TEST_KEY, GATEWAY_TEST_KEY_2",
            upstream.url("")
        )),
        "{}",
        running.banner
    );
    assert!(
        !running.banner.contains("gsk_binary_test"),
        "{}",
        running.banner
    );
    let (status, body) = post_chat(running.addr).await;
    assert_eq!(status, 200, "{body}");
    let keys = get_keys(running.addr).await;
    assert_eq!(keys["keys"][0]["state"], "disabled", "{keys}");
    assert_eq!(keys["keys"][0]["reason"], "invalid_key", "{keys}");
    assert_eq!(keys["keys"][1]["successes"], 1, "{keys}");
    assert_eq!(provider.stats().total().requests, 2);
    drop(running);

    // --fake: no key and no upstream needed.
    let mut command = Command::new(&bin);
    command
        .args(["--fake", "--listen", "127.0.0.1:0"])
        .env_remove("UPSTREAM_URL");
    let running = launch(command);
    assert!(
        running.banner.contains("(the fake Groq API)"),
        "{}",
        running.banner
    );
    for _ in 0..5 {
        let (status, body) = post_chat(running.addr).await;
        assert_eq!(status, 200, "{body}");
    }
    let keys = get_keys(running.addr).await;
    assert_eq!(keys["keys"][0]["successes"], 3, "{keys}");
    assert_eq!(keys["keys"][1]["successes"], 2, "{keys}");
    drop(running);

    // Missing keys and an https upstream are refused with a message naming the variable.
    let out = Command::new(&bin)
        .args([
            "--keys-env",
            "GATEWAY_TEST_NO_SUCH_KEY",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("UPSTREAM_URL", upstream.url(""))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("set GATEWAY_TEST_NO_SUCH_KEY"), "{stderr}");
    let out = Command::new(&bin)
        .env("UPSTREAM_URL", "https://api.groq.com")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("UPSTREAM_URL") && stderr.contains("TLS"),
        "{stderr}"
    );
}
