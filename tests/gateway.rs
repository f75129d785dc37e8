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

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
#[path = "support/example.rs"]
mod example;
#[allow(dead_code)]
#[path = "../src/bin/key-fallback-gateway/main.rs"]
mod gateway;
#[path = "support/tls.rs"]
mod tls;

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
    let (status, headers, body) = setup.call("POST", CHAT, full(vec![b' '; CAP + 1])).await;
    assert_eq!(status, 413, "{body}");
    // The unread body's connection closes: the client is told, so it sends no more on it.
    assert_eq!(headers["connection"], "close");
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

    // The status: key 1 passed over for its rate limit in the request's bucket (its model;
    // the gateway names it), so still active for other models; key 2 serving; counts as
    // the provider saw them.
    let keys = setup.keys(&[limited, ok]).await;
    assert_eq!(keys["available"], 2, "{keys}");
    let first = &keys["keys"][0];
    assert_eq!(first["label"], "GROQ_API_KEY");
    assert_eq!(first["state"], "active");
    let bucket = &first["buckets"][0];
    assert_eq!(bucket["bucket"], "llama-3.1-8b-instant", "{keys}");
    let remaining = bucket["passed_over_ms"].as_u64().unwrap();
    assert!(remaining > 0 && remaining <= 30_000, "{remaining}");
    // Its 429, and the `GET /openai/v1/models` above (no model: not in that bucket).
    assert_eq!(first["requests"], 2);
    assert_eq!(first["rate_limited"], 1);
    assert!(first["fingerprint"].as_str().unwrap().starts_with("fp:"));
    let second = &keys["keys"][1];
    assert_eq!(second["label"], "GROQ_API_KEY_2");
    assert_eq!(second["state"], "active");
    assert_eq!(second["reason"], Value::Null);
    assert_eq!(second["requests"], 3);
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

    // Each key said it has none left for the model: passed over in that bucket.
    let keys = setup.keys(&[one, two]).await;
    for key in keys["keys"].as_array().unwrap() {
        let bucket = &key["buckets"][0];
        assert_eq!(bucket["requests_remaining"], 0, "{keys}");
        assert!(
            bucket["passed_over_ms"].as_u64().is_some_and(|ms| ms > 0),
            "{keys}"
        );
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
        assert!(
            key["buckets"][0]["passed_over_ms"].as_u64().is_some(),
            "{keys}"
        );
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
    // An unreachable upstream is the same for every key: one attempt, no key blamed, no
    // second key tried.
    let keys = handle.status().keys;
    assert_eq!((keys[0].requests, keys[0].errors), (1, 0), "{:?}", keys[0]);
    assert_eq!((keys[1].requests, keys[1].errors), (0, 0), "{:?}", keys[1]);
    assert!(keys.iter().all(|k| k.is_available()));
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
    let https = gateway::parse_upstream("https://api.groq.com/openai/").unwrap();
    assert_eq!(
        gateway::upstream_uri(&https, "/v1/models").unwrap(),
        "https://api.groq.com/openai/v1/models"
    );
    let ftp = gateway::parse_upstream("ftp://api.groq.com").unwrap_err();
    assert!(
        ftp.contains("https://") && ftp.contains("UPSTREAM_URL"),
        "{ftp}"
    );
    assert!(gateway::parse_upstream("api.groq.com").is_err());
    let port = gateway::parse_upstream("http://127.0.0.1:9000openai/v1").unwrap_err();
    assert!(port.contains("port"), "{port}");
    assert!(gateway::parse_upstream("http://[::1]:9000/v1").is_ok());
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
        Ok(gateway::Command::Run(config)) => *config,
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

    // Client tokens: from GATEWAY_CLIENT_TOKENS or the variable named; errors name the
    // variable, never a token.
    let config = run(parse(&[], &[("GATEWAY_CLIENT_TOKENS", "t-1,t-2")]));
    assert!(matches!(&config.clients, gateway::Clients::Tokens(t) if t.len() == 2));
    assert!(!format!("{config:?}").contains("t-1"));
    let config = run(parse(
        &["--client-tokens-env", "MY_TOKENS"],
        &[("MY_TOKENS", "secret-tok")],
    ));
    assert!(matches!(&config.clients, gateway::Clients::Tokens(t) if t.len() == 1));
    for bad in [" , ", "ok,bad tok\u{7f}"] {
        let err = parse(&[], &[("GATEWAY_CLIENT_TOKENS", bad)]).unwrap_err();
        assert!(err.contains("GATEWAY_CLIENT_TOKENS"), "{err}");
        assert!(!err.contains("bad tok"), "{err}");
    }
    let config = run(parse(&["--log-level", "warn"], &[]));
    assert_eq!(config.log_level, tracing::level_filters::LevelFilter::WARN);
    let config = run(parse(&[], &[("GATEWAY_LOG_LEVEL", "off")]));
    assert_eq!(config.log_level, tracing::level_filters::LevelFilter::OFF);
    assert!(parse(&["--log-level", "loud"], &[]).is_err());
    // Threads: one by default, else from --threads or GATEWAY_THREADS; errors name the source.
    assert_eq!(run(parse(&[], &[])).threads, 1);
    assert_eq!(run(parse(&["--threads", "4"], &[])).threads, 4);
    assert_eq!(run(parse(&[], &[("GATEWAY_THREADS", "2")])).threads, 2);
    for bad in ["0", "two", "1025"] {
        let err = parse(&["--threads", bad], &[]).unwrap_err();
        assert!(err.contains("--threads"), "{err}");
        let err = parse(&[], &[("GATEWAY_THREADS", bad)]).unwrap_err();
        assert!(err.contains("GATEWAY_THREADS"), "{err}");
    }
    let err = parse(&["--client-tokens-env", "NOPE_TOKENS"], &[]).unwrap_err();
    assert!(err.contains("NOPE_TOKENS is not set"), "{err}");

    // With nothing said, Groq: keys from GROQ_API_KEY…, requests to https://api.groq.com.
    let config = run(parse(&[], &[]));
    assert_eq!(config.clients, gateway::Clients::LoopbackOnly);
    assert_eq!(config.upstream.unwrap(), "https://api.groq.com/");
    assert_eq!(config.keys_env, "GROQ_API_KEY");
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
    example::binary("key-fallback-gateway")
}

/// Leaves out the gateway's variables that the environment running the tests may have.
fn clear_gateway_env(command: &mut Command) {
    for var in [
        "GATEWAY_LISTEN",
        "GATEWAY_ALLOWED_HOSTS",
        "GATEWAY_ALLOW_SAME_SITE",
        "GATEWAY_ADMIN_TOKEN",
        "GATEWAY_CLIENT_TOKENS",
        "GATEWAY_LOG_FORMAT",
        "GATEWAY_LOG_LEVEL",
        "GATEWAY_CONFIG",
        "GATEWAY_HEADER_TIMEOUT",
        "GATEWAY_BODY_TIMEOUT",
        "GATEWAY_THREADS",
        "REDIS_URL",
        "GATEWAY_REDIS_NAMESPACE",
    ] {
        command.env_remove(var);
    }
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

/// The gateway's standard error once it holds `needle` (its log lines are written in
/// batches, at most `logs::FLUSH_EVERY` late); fails after `WAIT`.
async fn logged(running: &Running, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let logs = running.stderr.lock().unwrap().clone();
        if logs.contains(needle) {
            return logs;
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?}:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// `GET /metrics` on the binary: Prometheus text with the attempts and the cooldowns of two
/// 429s (a rate limit on the request's model, a spent quota) when it was built with the
/// crate feature `metrics`, a 404 naming the command otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_metrics_when_built_with_them() {
    let bin = gateway_binary();
    let limited = "gsk_metrics_test_limited";
    let spent = "gsk_metrics_test_spent";
    let good = "gsk_metrics_test_good";
    let provider = FakeProvider::builder()
        .key(
            limited,
            Behavior::RateLimited {
                requests: 0,
                window: Duration::from_secs(30),
            },
        )
        .key(spent, Behavior::QuotaExhausted)
        .key(good, Behavior::Ok)
        .build();
    let upstream = provider.serve_ephemeral().await.unwrap();
    let mut command = Command::new(&bin);
    command
        .args(["--listen", "127.0.0.1:0", "--keys-env", "GATEWAY_TEST_KEY"])
        .env("UPSTREAM_URL", upstream.url(""))
        .env("GATEWAY_TEST_KEY", limited)
        .env("GATEWAY_TEST_KEY_2", spent)
        .env("GATEWAY_TEST_KEY_3", good);
    clear_gateway_env(&mut command);
    let running = launch(command);
    let (status, body) = post_chat(running.addr).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(provider.stats().key(limited).rate_limited, 1);
    assert_eq!(provider.stats().key(spent).quota_exhausted, 1);

    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = Request::get(format!("http://{}/metrics", running.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = timeout(WAIT, client.request(req)).await.unwrap().unwrap();
    let (head, body) = res.into_parts();
    let body = timeout(WAIT, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(!text.contains("gsk_"), "a key in /metrics: {text}");

    assert_eq!(head.status, 200, "{text}");
    assert_eq!(
        head.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let samples = prometheus_samples(&text);
    let value = |series: &str| {
        samples
            .iter()
            .find(|(s, _)| s == series)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    let expected = [
        (
            r#"key_fallback_attempts_total{key="GATEWAY_TEST_KEY",verdict="rate_limited"}"#,
            1.0,
        ),
        (
            r#"key_fallback_attempts_total{key="GATEWAY_TEST_KEY_2",verdict="quota_exhausted"}"#,
            1.0,
        ),
        (
            r#"key_fallback_attempts_total{key="GATEWAY_TEST_KEY_3",verdict="success"}"#,
            1.0,
        ),
        // The rate limit holds for the request's model (the gateway's bucket) only.
        (
            r#"key_fallback_bucket_cooldowns_total{key="GATEWAY_TEST_KEY",reason="rate_limited"}"#,
            1.0,
        ),
        (
            r#"key_fallback_cooldowns_total{key="GATEWAY_TEST_KEY_2",reason="quota_exhausted"}"#,
            1.0,
        ),
        (
            r#"key_fallback_cooldown_seconds_count{reason="quota_exhausted"}"#,
            1.0,
        ),
        (
            r#"key_fallback_switches_total{key="GATEWAY_TEST_KEY",reason="rate_limited"}"#,
            1.0,
        ),
        (
            r#"key_fallback_switches_total{key="GATEWAY_TEST_KEY_2",reason="quota_exhausted"}"#,
            1.0,
        ),
        (
            r#"key_fallback_key_state{key="GATEWAY_TEST_KEY_2",state="cooling_down"}"#,
            1.0,
        ),
        (
            r#"key_fallback_key_state{key="GATEWAY_TEST_KEY_2",state="active"}"#,
            0.0,
        ),
        (
            r#"key_fallback_key_state{key="GATEWAY_TEST_KEY_3",state="active"}"#,
            1.0,
        ),
    ];
    for (series, expected) in expected {
        assert_eq!(value(series), expected, "{series} in:\n{text}");
    }
    let until =
        value(r#"key_fallback_key_cooldown_until_timestamp_seconds{key="GATEWAY_TEST_KEY_2"}"#);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(until > now, "the cooldown ends later: {until} vs {now}");
    assert!(
        text.contains("# TYPE key_fallback_attempts_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE key_fallback_key_state gauge\n"),
        "{text}"
    );
}

/// The samples of a Prometheus text exposition, as (`name{labels}`, value), checked line by
/// line: `# HELP` and `# TYPE` lines, a `# TYPE` before each metric's samples, counters named
/// `_total`, label values quoted, values numbers.
fn prometheus_samples(text: &str) -> Vec<(String, f64)> {
    let mut types: Vec<(String, String)> = Vec::new();
    let mut samples = Vec::new();
    assert!(text.ends_with('\n'), "{text}");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect(line);
            assert!(
                ["counter", "gauge", "summary", "histogram", "untyped"].contains(&kind),
                "{line}"
            );
            if kind == "counter" {
                assert!(
                    name.ends_with("_total"),
                    "a counter not named _total: {line}"
                );
            }
            assert!(
                types.iter().all(|(n, _)| n != name),
                "two TYPE lines: {line}"
            );
            types.push((name.to_owned(), kind.to_owned()));
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
        let name_end = line.find(['{', ' ']).expect(line);
        let name = &line[..name_end];
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        let (series, value) = line.rsplit_once(' ').expect(line);
        if series.len() > name.len() {
            let labels = &series[name.len()..];
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            for pair in labels[1..labels.len() - 1].split("\",") {
                let (label, value) = pair.split_once("=\"").expect(line);
                assert!(
                    label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                assert!(!value.trim_end_matches('"').contains('"'), "{line}");
            }
        }
        let value: f64 = value.parse().expect(line);
        // Its metric: the name, or a summary's or histogram's name without the suffix.
        let family = types.last().map(|(n, k)| (n.as_str(), k.as_str()));
        let belongs = family.is_some_and(|(n, k)| {
            n == name
                || (k == "summary" || k == "histogram")
                    && ["_sum", "_count", "_bucket"]
                        .iter()
                        .any(|suffix| name.strip_suffix(suffix) == Some(n))
        });
        assert!(belongs, "a sample after another metric's TYPE line: {line}");
        samples.push((series.to_owned(), value));
    }
    assert!(!samples.is_empty(), "{text}");
    samples
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
        .env("GATEWAY_TEST_KEY_2", "gsk_binary_test_good");
    clear_gateway_env(&mut command);
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
    // Which admin mode is in force, in one line.
    assert!(
        running.banner.contains(
            "admin endpoints /keys: loopback clients only (GATEWAY_ADMIN_TOKEN is not set)"
        ),
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
    clear_gateway_env(&mut command);
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

    // Missing keys are refused with a message naming the variable, and so is a CA file that
    // holds no certificate.
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
    let mut cmd = Command::new(&bin);
    clear_gateway_env(&mut cmd);
    let out = cmd
        .env("UPSTREAM_URL", "https://api.groq.com")
        .env(
            "UPSTREAM_CA_FILE",
            env!("CARGO_MANIFEST_DIR").to_owned() + "/Cargo.toml",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("UPSTREAM_CA_FILE") && stderr.contains("Cargo.toml"),
        "{stderr}"
    );
}

/// An `https://` upstream: the fake provider behind a TLS front whose certificate a test CA
/// signed, trusted through `UPSTREAM_CA_FILE`'s roots. Key 1 is refused over TLS, key 2
/// serves; without the CA the handshake fails and the gateway answers 502.
#[tokio::test]
async fn an_https_upstream_is_reached_over_tls() {
    use std::sync::Arc as StdArc;
    use tokio_rustls::rustls::{self, pki_types::pem::PemObject};

    let test_ca = tls::TestCa::make("gateway");
    let provider = FakeProvider::builder()
        .key("gsk_tls_one", Behavior::InvalidKey)
        .key("gsk_tls_two", Behavior::Ok)
        .build();
    let plain = provider.serve_ephemeral().await.unwrap();
    let plain_addr: SocketAddr = plain
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    // The TLS front: terminates TLS, then pipes the bytes to the plain fake provider.
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(&test_ca.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&test_ca.key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(StdArc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(StdArc::new(config));
    let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = front.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut inner = TcpStream::connect(plain_addr).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut inner).await;
            });
        }
    });

    let keys = || {
        KeySet::from_vars(
            "GROQ_API_KEY",
            [
                ("GROQ_API_KEY", "gsk_tls_one"),
                ("GROQ_API_KEY_2", "gsk_tls_two"),
            ],
        )
        .unwrap()
    };
    let base =
        gateway::parse_upstream(&format!("https://127.0.0.1:{}/", front_addr.port())).unwrap();
    let trusting = gateway::Settings {
        upstream_roots: gateway::read_roots(test_ca.ca.to_str().unwrap()).unwrap(),
        ..settings()
    };
    let addr = serve(gateway::app(
        base.clone(),
        KeyFallbackLayer::new(keys()),
        &trusting,
    ))
    .await;
    let (status, body) = post_chat(addr).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(provider.stats().key("gsk_tls_one").requests, 1);
    assert_eq!(provider.stats().key("gsk_tls_two").requests, 1);

    // The bundled roots alone do not know the test CA.
    let addr = serve(gateway::app(
        base,
        KeyFallbackLayer::new(keys()),
        &settings(),
    ))
    .await;
    let (status, body) = post_chat(addr).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(provider.stats().key("gsk_tls_two").requests, 1);
    let _ = std::fs::remove_dir_all(&test_ca.dir);
}

// ---------------------------------------------------------------------------------------
// The protections, over raw loopback TCP: requests written by hand, as an attacker can.
// ---------------------------------------------------------------------------------------

/// How long a test waits for the gateway to cut off a client it gave 200 ms: generous, so a
/// loaded machine does not fail the test, and far below the defaults (10 s, 30 s) and below
/// what a gateway without the timeout would take (never).
const CUT_OFF: Duration = Duration::from_secs(5);
/// The head and body timeouts of the tests that check them.
const SHORT: Duration = Duration::from_millis(200);

/// What came back on a raw connection: the status (0 when the connection closed without an
/// answer), the head as text, and the body.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads until the peer closes the connection (or resets it), at most 1 MiB; `None` when
/// it is still open after `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let read = async {
        // At most 64 reads of up to 16 KiB: bounded in count as well as time.
        for _ in 0..64 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    timeout(within, read).await.ok()?;
    Some(out)
}

fn parse_raw(bytes: &[u8]) -> Raw {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Raw {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// Writes `request` as it is on a new connection to `addr` and reads the answer, up to the
/// gateway closing the connection (every request here says `Connection: close`, and every
/// refusal closes it). Panics when it stays open past [`WAIT`].
async fn raw(addr: SocketAddr, request: &str) -> Raw {
    let mut stream = timeout(WAIT, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let bytes = read_until_closed(&mut stream, WAIT)
        .await
        .unwrap_or_else(|| panic!("no answer, or the connection stays open: {request:?}"));
    parse_raw(&bytes)
}

/// `METHOD target HTTP/1.1`, the headers given (`Host` among them, or not), and
/// `Connection: close`; no body.
fn head(method: &str, target: &str, headers: &[(&str, &str)]) -> String {
    let mut out = format!("{method} {target} HTTP/1.1\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

/// A request made with hyper's client, with `headers` (it adds `Host` from the URL).
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = timeout(
        WAIT,
        client.request(req.body(Full::new(Bytes::new())).unwrap()),
    )
    .await
    .expect("the gateway answers in time")
    .expect("the gateway answers");
    let (head, body) = res.into_parts();
    let body = timeout(WAIT, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (
        head.status,
        head.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_hosts_it_serves_are_answered() {
    let key = "gsk_gateway_host_key";
    let mut settings = settings();
    settings.allowed_hosts.allow("gateway.test").unwrap();
    let setup = start_with(&[("GROQ_API_KEY", key, Behavior::Ok)], &settings).await;
    let port = setup.gateway.port();

    // Loopback names and addresses, any port and any case, and the one name added.
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "LocalHost".to_owned(),
        format!("[::1]:{port}"),
        "127.0.0.2".to_owned(),
        "gateway.test".to_owned(),
        "Gateway.TEST:9".to_owned(),
    ] {
        let res = raw(setup.gateway, &head("GET", "/keys", &[("Host", &host)])).await;
        assert_eq!(res.status, 200, "Host: {host}: {res:?}");
    }

    // A DNS-rebinding page's host, with or without the port, look-alikes, and 0.0.0.0 (which
    // some browsers send to loopback): 421 for the status, the upstream and the fallback.
    for host in [
        "evil.example".to_owned(),
        format!("evil.example:{port}"),
        format!("0.0.0.0:{port}"),
        "localhost.evil.example".to_owned(),
        "gateway.test.evil.example".to_owned(),
        "127.0.0.1.nip.io".to_owned(),
    ] {
        for (method, path) in [
            ("GET", "/keys"),
            ("POST", "/keys/reset"),
            ("GET", "/nowhere"),
        ] {
            let res = raw(setup.gateway, &head(method, path, &[("Host", &host)])).await;
            assert_eq!(res.status, 421, "{method} {path} Host: {host}: {res:?}");
            assert_eq!(res.code(), "host_not_allowed", "{res:?}");
            assert!(res.body.contains("--allowed-host"), "{res:?}");
            assert!(!res.body.contains("GROQ_API_KEY") && !res.body.contains("fp:"));
        }
        let chat = format!(
            "POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{}",
            chat_body(false).len(),
            chat_body(false)
        );
        let res = raw(setup.gateway, &chat).await;
        assert_eq!(res.status, 421, "chat with Host: {host}: {res:?}");
    }
    // An absolute-form target names the host too.
    let res = raw(
        setup.gateway,
        &head(
            "GET",
            "http://evil.example/keys",
            &[("Host", &format!("127.0.0.1:{port}"))],
        ),
    )
    .await;
    assert_eq!(res.status, 421, "{res:?}");

    // No Host, two, or one that is not a host: 400.
    let res = raw(setup.gateway, &head("GET", "/keys", &[])).await;
    assert_eq!(
        (res.status, res.code().as_str()),
        (400, "missing_host"),
        "{res:?}"
    );
    let two = [("Host", "127.0.0.1"), ("Host", "evil.example")];
    let res = raw(setup.gateway, &head("GET", "/keys", &two)).await;
    assert_eq!(
        (res.status, res.code().as_str()),
        (400, "invalid_host"),
        "{res:?}"
    );
    for host in ["user@127.0.0.1", "127.0.0.1:80:80", "local host", "[::1"] {
        let res = raw(setup.gateway, &head("GET", "/keys", &[("Host", host)])).await;
        assert_eq!(res.status, 400, "Host: {host}: {res:?}");
    }

    // None of it reached the provider; a request for a served host does.
    assert_eq!(setup.provider.stats().total().requests, 0);
    let (status, _, body) = setup.chat().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(setup.provider.stats().total().requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_requests_are_refused_before_the_body_is_read() {
    let (limited, ok) = ("gsk_gateway_site_limited", "gsk_gateway_site_ok");
    // A body timeout far beyond the test's waits: an answer to a request whose body never
    // comes is the check's, not a timeout's.
    let settings = gateway::Settings {
        body_timeout: Duration::from_secs(600),
        ..settings()
    };
    let limited_behavior = Behavior::RateLimited {
        requests: 0,
        window: Duration::from_secs(30),
    };
    let setup = start_with(
        &[
            ("GROQ_API_KEY", limited, limited_behavior),
            ("GROQ_API_KEY_2", ok, Behavior::Ok),
        ],
        &settings,
    )
    .await;
    let host = format!("127.0.0.1:{}", setup.gateway.port());
    // Key 1 is now cooling down; a reset would make it active again.
    let (status, _, body) = setup.chat().await;
    assert_eq!(status, 200, "{body}");
    let before = setup.provider.stats().total().requests;

    // The "simple request" a page on another site can send without a preflight: a text/plain
    // POST. Its body is declared and never sent, so only an answer that does not wait for the
    // body arrives.
    for origin in ["http://evil.example", "https://evil.example:443", "null"] {
        let post = format!(
            "POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\n\
             Content-Type: text/plain\r\nContent-Length: 60\r\nConnection: close\r\n\r\n"
        );
        let res = raw(setup.gateway, &post).await;
        assert_eq!(res.status, 403, "Origin: {origin}: {res:?}");
        assert_eq!(res.code(), "cross_site_request", "{res:?}");
    }
    // The browser's own marker, with the reset a page would want.
    for (site, with_origin) in [
        ("cross-site", false),
        ("same-site", false),
        ("cross-site", true),
    ] {
        let mut headers = vec![
            ("Host", host.as_str()),
            ("Sec-Fetch-Site", site),
            ("Content-Type", "text/plain"),
            ("Content-Length", "0"),
        ];
        if with_origin {
            headers.push(("Origin", "http://evil.example"));
        }
        for path in ["/keys/reset", "/keys", CHAT] {
            let res = raw(setup.gateway, &head("POST", path, &headers)).await;
            assert_eq!(res.status, 403, "{path} Sec-Fetch-Site: {site}: {res:?}");
            assert_eq!(res.code(), "cross_site_request", "{res:?}");
            assert!(!res.body.contains("fp:"), "{res:?}");
        }
    }
    // Nothing was forwarded, nothing reset: key 1 is still passed over for the model.
    assert_eq!(setup.provider.stats().total().requests, before);
    let keys = setup.keys(&[limited, ok]).await;
    let passed_over = &keys["keys"][0]["buckets"][0]["passed_over_ms"];
    assert!(passed_over.as_u64().is_some_and(|ms| ms > 0), "{keys}");

    // Same origin, a page on a served host, a typed-in URL, and no browser at all pass.
    let port = setup.gateway.port();
    let local_page = format!("http://localhost:{port}");
    for headers in [
        vec![("Sec-Fetch-Site", "same-origin")],
        vec![("Sec-Fetch-Site", "none")],
        vec![
            ("Origin", local_page.as_str()),
            ("Sec-Fetch-Site", "same-origin"),
        ],
        vec![("Origin", "http://127.0.0.1:3000")],
        vec![],
    ] {
        let (status, _, body) = request(setup.gateway, "GET", "/keys", &headers).await;
        assert_eq!(status, 200, "{headers:?}: {body}");
    }
    let with_origin = Request::post(format!("http://{}{CHAT}", setup.gateway))
        .header("origin", &local_page)
        .header("content-type", "application/json")
        .body(full(chat_body(false)))
        .unwrap();
    let res = timeout(WAIT, setup.client.request(with_origin))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(setup.provider.stats().total().requests > before);

    // --allow-same-site lets same-site pages in; cross-site ones are still refused.
    let upstream = setup.provider.serve_ephemeral().await.unwrap();
    let layer = KeyFallbackLayer::new(KeySet::new([ok]).unwrap());
    let base = gateway::parse_upstream(&upstream.url("")).unwrap();
    let same_site = gateway::Settings {
        allow_same_site: true,
        ..settings.clone()
    };
    let addr = serve_with(gateway::app(base, layer, &same_site), &same_site).await;
    let (status, _, body) = request(addr, "GET", "/keys", &[("Sec-Fetch-Site", "same-site")]).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) =
        request(addr, "GET", "/keys", &[("Sec-Fetch-Site", "cross-site")]).await;
    assert_eq!(status, 403, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_endpoints_need_the_admin_token_when_one_is_set() {
    const TOKEN: &str = "gw-test-admin-token-5f2c9a0e";
    let key = "gsk_gateway_admin_key";
    let settings = gateway::Settings {
        admin: gateway::Admin::Token(gateway::AdminToken::new(TOKEN).unwrap()),
        ..settings()
    };
    let setup = start_with(&[("GROQ_API_KEY", key, Behavior::Ok)], &settings).await;
    let bearer = format!("Bearer {TOKEN}");
    let lowercase = format!("bearer {TOKEN}");
    let short = format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]);
    let long = format!("Bearer {TOKEN}x");
    let basic = format!("Basic {TOKEN}");

    for (method, path) in [
        ("GET", "/keys"),
        ("POST", "/keys/reset"),
        ("POST", "/keys/GROQ_API_KEY/reset"),
    ] {
        // No credential: 401 with the challenge. Loopback is no exception once a token is set.
        let (status, headers, body) = request(setup.gateway, method, path, &[]).await;
        assert_eq!(status, 401, "{method} {path}: {body}");
        let challenge = headers["www-authenticate"].to_str().unwrap();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        assert!(body.contains("admin_token_required"), "{body}");
        assert!(!body.contains("fp:"), "{body}");
        // A wrong credential: 401, saying the token is wrong.
        for wrong in [
            "Bearer nope",
            short.as_str(),
            long.as_str(),
            basic.as_str(),
            "Bearer",
        ] {
            let (status, headers, body) =
                request(setup.gateway, method, path, &[("authorization", wrong)]).await;
            assert_eq!(status, 401, "{method} {path} with {wrong:?}: {body}");
            let challenge = headers["www-authenticate"].to_str().unwrap();
            assert!(
                challenge.contains(r#"error="invalid_token""#),
                "{challenge}"
            );
            assert!(!body.contains(TOKEN), "{body}");
        }
        // The token, in either case of the scheme.
        for good in [&bearer, &lowercase] {
            let (status, _, body) =
                request(setup.gateway, method, path, &[("authorization", good)]).await;
            assert_eq!(status, 200, "{method} {path}: {body}");
            assert!(!body.contains(TOKEN), "{body}");
        }
    }
    // The API itself does not need it (the client's own token is replaced by a pool key).
    let (status, _, body) = setup.chat().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(setup.provider.stats().key(key).served, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_keys_endpoints_answer_loopback_peers_only() {
    use tower::ServiceExt;
    let layer = || KeyFallbackLayer::new(KeySet::new(["gsk_gateway_peer_key"]).unwrap());
    let (upstream, seen) = echo_upstream().await;
    let base = gateway::parse_upstream(&format!("http://{upstream}")).unwrap();

    // Served by `gateway::serve`, which records the peer: loopback clients get the status.
    let addr = serve(gateway::app(base.clone(), layer(), &settings())).await;
    let (status, _, body) = request(addr, "GET", "/keys", &[]).await;
    assert_eq!(status, 200, "{body}");

    // Served without the peer address recorded: nobody, for the admin endpoints and (with no
    // client token set) for the API too.
    let app = gateway::app(base.clone(), layer(), &settings());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (status, _, body) = request(plain, "GET", "/keys", &[]).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("admin_loopback_only"), "{body}");
    let (status, _, body) = request(plain, "POST", "/openai/v1/models", &[]).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("clients_loopback_only"), "{body}");
    assert_eq!(seen.lock().unwrap().len(), 0);

    // A client elsewhere cannot be had on loopback, so the router is called in process with
    // the peer address `serve` would record. Headers claiming loopback change nothing.
    let app = gateway::app(base, layer(), &settings());
    let keys_from = |peer: &str, spoof: bool| {
        let peer: SocketAddr = peer.parse().unwrap();
        let mut req = Request::get("/keys").header("host", "127.0.0.1");
        if spoof {
            req = req
                .header("x-forwarded-for", "127.0.0.1")
                .header("x-real-ip", "127.0.0.1")
                .header("forwarded", "for=127.0.0.1");
        }
        let mut req = req.body(axum::body::Body::empty()).unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let app = app.clone();
        async move { timeout(WAIT, app.oneshot(req)).await.unwrap().unwrap() }
    };
    for peer in [
        "192.0.2.7:40000",
        "[2001:db8::7]:40000",
        "[::ffff:192.0.2.7]:1",
    ] {
        for spoof in [false, true] {
            let res = keys_from(peer, spoof).await;
            assert_eq!(res.status(), 403, "{peer} (spoofed: {spoof})");
        }
    }
    for peer in ["127.0.0.1:40000", "[::1]:40000", "[::ffff:127.0.0.1]:40000"] {
        assert_eq!(keys_from(peer, false).await.status(), 200, "{peer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_and_their_encodings_never_reach_the_upstream() {
    let (upstream, seen) = echo_upstream().await;
    let layer = KeyFallbackLayer::new(KeySet::new(["gsk_gateway_path_key"]).unwrap());
    let base = gateway::parse_upstream(&format!("http://{upstream}")).unwrap();
    let addr = serve(gateway::app(base, layer, &settings())).await;
    let host = format!("127.0.0.1:{}", addr.port());
    let absolute = format!("http://{host}/openai/v1/../admin/secret");

    let targets = [
        // The issue's three forms.
        "/openai/v1/../../admin/secret",
        "/openai/v1/%2e%2e/%2e%2e/admin/secret",
        "/openai/v1/..%2f..%2fadmin/secret",
        // Their cousins: case, half-encoded, single dots, trailing, slashes and backslashes.
        "/openai/v1/%2E%2E/admin/secret",
        "/openai/v1/..%2F..%2Fadmin/secret",
        "/openai/v1/.%2e/admin",
        "/openai/v1/%2e./admin",
        "/openai/v1/./models",
        "/openai/v1/%2e/models",
        "/openai/v1/chat/completions/..",
        "/openai/v1/..",
        "/openai/v1/models/%2f..",
        "/openai/v1/models%2f..%2f..%2fadmin",
        "/openai/v1/files/a%2fb",
        "/openai/v1/..%5c..%5cadmin",
        "/openai/v1/models\\..\\admin",
        // Encoded twice or more, and a path parameter after the dots.
        "/openai/v1/%252e%252e/admin",
        "/openai/v1/%25252e%25252e/admin",
        "/openai/v1/..%252fadmin",
        "/openai/v1/%2525252e%2525252e/admin",
        "/openai/v1/..;/admin",
        // A control character.
        "/openai/v1/models%00.json",
        absolute.as_str(),
    ];
    for target in targets {
        for method in ["GET", "POST"] {
            let res = raw(addr, &head(method, target, &[("Host", &host)])).await;
            // hyper passes each of these on as it came: the gateway refuses them itself.
            assert_eq!(res.status, 400, "{method} {target}: {res:?}");
            assert_eq!(res.code(), "invalid_path", "{target}: {res:?}");
            assert!(!res.body.contains("admin"), "the path is echoed: {res:?}");
        }
    }
    assert_eq!(*seen.lock().unwrap(), Vec::<String>::new());

    // Dots inside a segment, and dots in the query, are nothing special.
    let target = "/openai/v1/models/llama-3.1.json?after=../x";
    let res = raw(addr, &head("GET", target, &[("Host", &host)])).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(*seen.lock().unwrap(), vec![format!("GET {target}")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_that_does_not_arrive_is_cut_off() {
    let settings = gateway::Settings {
        header_timeout: SHORT,
        ..settings()
    };
    let (upstream, seen) = echo_upstream().await;
    let layer = KeyFallbackLayer::new(KeySet::new(["gsk_gateway_head_key"]).unwrap());
    let base = gateway::parse_upstream(&format!("http://{upstream}")).unwrap();
    let addr = serve_with(gateway::app(base, layer, &settings), &settings).await;

    // Half a head, then nothing; and nothing at all.
    for sent in [
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        "",
    ] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(sent.as_bytes()).await.unwrap();
        let started = Instant::now();
        let answer = read_until_closed(&mut stream, CUT_OFF).await;
        let answer = answer.unwrap_or_else(|| {
            panic!("still open after {CUT_OFF:?} with a 200 ms header timeout: {sent:?}")
        });
        // Closed, with nothing forwarded; hyper closes without an answer (at most a 408).
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
        assert!(started.elapsed() < CUT_OFF);
    }
    assert!(seen.lock().unwrap().is_empty());

    // A whole head within the time is served as usual.
    let res = raw(
        addr,
        &head("GET", "/openai/v1/models", &[("Host", "127.0.0.1")]),
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");

    // The bound is on the head only: a streamed answer that takes longer than it (9 events
    // 60 ms apart) comes through whole.
    let ok = "gsk_gateway_head_stream";
    let setup = start_with(&[("GROQ_API_KEY", ok, Behavior::Ok)], &settings).await;
    let started = Instant::now();
    let (status, _, body) = setup.call("POST", CHAT, full(chat_body(true))).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert!(started.elapsed() > SHORT, "{:?}", started.elapsed());
    assert_eq!(setup.provider.stats().key(ok).streamed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_does_not_arrive_gets_a_408() {
    let settings = gateway::Settings {
        body_timeout: SHORT,
        ..settings()
    };
    let (upstream, seen) = echo_upstream().await;
    let layer = KeyFallbackLayer::new(KeySet::new(["gsk_gateway_body_key"]).unwrap());
    let base = gateway::parse_upstream(&format!("http://{upstream}")).unwrap();
    let addr = serve_with(gateway::app(base, layer, &settings), &settings).await;

    // 1000 bytes declared; none sent, or ten. The connection is not closed by the client.
    for sent in ["", "{\"model\":"] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: 1000\r\n\r\n{sent}"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let started = Instant::now();
        let answer = read_until_closed(&mut stream, CUT_OFF).await;
        let answer = answer.unwrap_or_else(|| {
            panic!("no answer within {CUT_OFF:?} with a 200 ms body timeout: {sent:?}")
        });
        assert!(started.elapsed() < CUT_OFF);
        let res = parse_raw(&answer);
        assert_eq!(res.status, 408, "{res:?}");
        assert_eq!(res.code(), "request_timeout", "{res:?}");
        assert_eq!(res.header("connection"), Some("close"), "{res:?}");
    }
    assert!(seen.lock().unwrap().is_empty());

    // A body that comes in time is forwarded.
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://{addr}/openai/v1/embeddings"))
        .body(Full::new(Bytes::from_static(b"{\"input\":\"hi\"}")))
        .unwrap();
    let res = timeout(WAIT, client.request(req)).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// `Command::parse` with these arguments and only these variables.
fn parse_command(args: &[&str], env: &[(&str, &str)]) -> Result<gateway::Command, String> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    gateway::Command::parse(args.iter().map(|a| a.to_string()), move |k| {
        env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    })
}

/// [`parse_command`] with an upstream, expecting a configuration.
fn config(args: &[&str], env: &[(&str, &str)]) -> gateway::Config {
    let mut env = env.to_vec();
    env.push(("UPSTREAM_URL", "http://127.0.0.1:9000"));
    match parse_command(args, &env) {
        Ok(gateway::Command::Run(config)) => *config,
        other => panic!("{args:?} {env:?}: {other:?}"),
    }
}

/// [`parse_command`] with an upstream, expecting an error.
fn config_error(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut env = env.to_vec();
    env.push(("UPSTREAM_URL", "http://127.0.0.1:9000"));
    match parse_command(args, &env) {
        Err(message) => message,
        other => panic!("{args:?} {env:?}: {other:?}"),
    }
}

#[test]
fn the_protections_on_the_command_line() {
    use gateway::{Admin, AdminToken, AllowedHosts};
    // The defaults: loopback hosts, no same-site pages, loopback-only admin, 10 s and 30 s.
    let defaults = config(&[], &[]);
    assert_eq!(defaults.allowed_hosts, AllowedHosts::loopback());
    assert!(!defaults.allow_same_site);
    assert_eq!(defaults.admin, Admin::LoopbackOnly);
    assert_eq!(defaults.admin_token_env, "GATEWAY_ADMIN_TOKEN");
    assert_eq!(defaults.header_timeout, Duration::from_secs(10));
    assert_eq!(defaults.body_timeout, Duration::from_secs(30));
    assert_eq!(defaults.settings(), gateway::Settings::default());

    // Allowed hosts from the variable, comma-separated; the flags, repeated, replace it.
    let hosts = config(
        &[],
        &[(
            "GATEWAY_ALLOWED_HOSTS",
            " a.test, B.test:8443,,[fd00::1],10.0.0.5 ",
        )],
    )
    .allowed_hosts;
    for served in [
        "a.test",
        "a.test:1",
        "b.test:8443",
        "[fd00::1]:5",
        "10.0.0.5:8080",
    ] {
        assert!(hosts.allows(served), "{served}");
    }
    for refused in ["b.test", "b.test:80", "c.test", "evil.example", "0.0.0.0"] {
        assert!(!hosts.allows(refused), "{refused}");
    }
    assert!(hosts.allows("localhost:8080") && hosts.allows("[::1]"));
    let flagged = config(
        &["--allowed-host", "c.test", "--allowed-host=fd00::2"],
        &[("GATEWAY_ALLOWED_HOSTS", "a.test")],
    )
    .allowed_hosts;
    assert!(flagged.allows("c.test") && flagged.allows("[fd00::2]:8080"));
    assert!(!flagged.allows("a.test"));
    assert!(config_error(&["--allowed-host", "http://x.test"], &[]).contains("URL"));
    assert!(config_error(&["--allowed-host", "a b"], &[]).contains("not a host name"));
    assert!(config_error(&["--allowed-host"], &[]).contains("needs"));

    assert!(config(&["--allow-same-site"], &[]).allow_same_site);
    assert!(config(&[], &[("GATEWAY_ALLOW_SAME_SITE", "1")]).allow_same_site);
    assert!(config_error(&[], &[("GATEWAY_ALLOW_SAME_SITE", "maybe")]).contains("maybe"));

    // Timeouts: ms, s, m or bare seconds; flags over variables; zero and nonsense refused.
    let timed = config(&["--header-timeout", "250ms", "--body-timeout=2m"], &[]);
    assert_eq!(timed.header_timeout, Duration::from_millis(250));
    assert_eq!(timed.body_timeout, Duration::from_secs(120));
    let timed = config(
        &["--body-timeout", "5s"],
        &[
            ("GATEWAY_HEADER_TIMEOUT", "3"),
            ("GATEWAY_BODY_TIMEOUT", "9s"),
        ],
    );
    assert_eq!(timed.header_timeout, Duration::from_secs(3));
    assert_eq!(timed.body_timeout, Duration::from_secs(5));
    assert_eq!(timed.settings().body_timeout, Duration::from_secs(5));
    for bad in ["0", "0ms", "10h", "abc", "-1s", "1.5s", ""] {
        let message = config_error(&["--header-timeout", bad], &[]);
        assert!(message.contains("--header-timeout"), "{bad}: {message}");
    }

    // The admin token: from GATEWAY_ADMIN_TOKEN or the variable named, trimmed, never shown.
    let secret = "gw-cli-admin-token-77d1";
    let with_token = config(&[], &[("GATEWAY_ADMIN_TOKEN", &format!(" {secret}\n"))]);
    assert_eq!(
        with_token.admin,
        Admin::Token(AdminToken::new(secret).unwrap())
    );
    assert_ne!(
        with_token.admin,
        Admin::Token(AdminToken::new("gw-cli-admin-token-77d2").unwrap())
    );
    assert!(
        !format!("{with_token:?}").contains(secret),
        "{with_token:?}"
    );
    assert!(!format!("{:?}", with_token.settings()).contains(secret));
    let named = config(
        &["--admin-token-env", "MY_GATEWAY_TOKEN"],
        &[
            ("MY_GATEWAY_TOKEN", secret),
            ("GATEWAY_ADMIN_TOKEN", "other"),
        ],
    );
    assert_eq!(named.admin, Admin::Token(AdminToken::new(secret).unwrap()));
    assert_eq!(named.admin_token_env, "MY_GATEWAY_TOKEN");
    let missing = config_error(&["--admin-token-env", "MY_GATEWAY_TOKEN"], &[]);
    assert!(
        missing.contains("MY_GATEWAY_TOKEN") && missing.contains("not set"),
        "{missing}"
    );
    let empty = config_error(&[], &[("GATEWAY_ADMIN_TOKEN", "  ")]);
    assert!(
        empty.contains("GATEWAY_ADMIN_TOKEN") && empty.contains("empty"),
        "{empty}"
    );
    let spaced = config_error(&[], &[("GATEWAY_ADMIN_TOKEN", "secret with spaces")]);
    assert!(spaced.contains("GATEWAY_ADMIN_TOKEN"), "{spaced}");
    assert!(
        !spaced.contains("secret"),
        "the value is in the error: {spaced}"
    );

    // The comparison itself.
    let token = AdminToken::new(secret).unwrap();
    assert!(token.matches(secret.as_bytes()));
    for wrong in [
        "",
        "gw",
        "gw-cli-admin-token-77d",
        "gw-cli-admin-token-77d1x",
        "GW-CLI-ADMIN-TOKEN-77D1",
    ] {
        assert!(!token.matches(wrong.as_bytes()), "{wrong}");
    }
    assert_eq!(format!("{token:?}"), "AdminToken(..)");

    // Paths: what is refused, and what is not.
    assert_eq!(gateway::unsafe_path("/openai/v1/chat/completions"), None);
    assert_eq!(
        gateway::unsafe_path("/openai/v1/models/llama-3.1.json"),
        None
    );
    assert_eq!(gateway::unsafe_path("/openai/v1/models/a%20b"), None);
    assert_eq!(gateway::unsafe_path("/openai/v1/files/100%"), None);
    for bad in [
        "/a/../b",
        "/a/%2e%2E/b",
        "/a/..%2fb",
        "/a/%5cb",
        "/a/%252e%252e",
        "/a/.;x",
    ] {
        let reason = gateway::unsafe_path(bad).unwrap_or_else(|| panic!("{bad} passes"));
        assert!(!reason.contains(bad), "{reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_guards_itself_as_configured() {
    const TOKEN: &str = "gw-binary-admin-token-93ab";
    let bin = gateway_binary();
    let provider = FakeProvider::builder()
        .key("gsk_binary_guard_key", Behavior::Ok)
        .build();
    let upstream = provider.serve_ephemeral().await.unwrap();
    let mut command = Command::new(&bin);
    command
        .args([
            "--listen",
            "127.0.0.1:0",
            "--keys-env",
            "GATEWAY_TEST_KEY",
            "--allowed-host",
            "gateway.test",
            "--admin-token-env",
            "GATEWAY_TEST_ADMIN_TOKEN",
            "--header-timeout",
            "200ms",
            "--body-timeout",
            "200ms",
        ])
        .env("UPSTREAM_URL", upstream.url(""))
        .env("GATEWAY_TEST_KEY", "gsk_binary_guard_key")
        .env("GATEWAY_TEST_ADMIN_TOKEN", TOKEN);
    clear_gateway_env(&mut command);
    let running = launch(command);
    let addr = running.addr;
    let banner = &running.banner;
    assert!(
        banner.contains(
            "admin endpoints /keys: need Authorization: Bearer with the token in \
             GATEWAY_TEST_ADMIN_TOKEN"
        ),
        "{banner}"
    );
    assert!(
        banner.contains("serving Host: localhost, loopback addresses, gateway.test"),
        "{banner}"
    );
    assert!(!banner.contains(TOKEN), "{banner}");

    // The admin token, the allowed host, and the refusals.
    let bearer = format!("Bearer {TOKEN}");
    let (status, _, body) = request(addr, "GET", "/keys", &[]).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = request(addr, "GET", "/keys", &[("authorization", &bearer)]).await;
    assert_eq!(status, 200, "{body}");
    let as_host = |host: &str| {
        head(
            "GET",
            "/keys",
            &[("Host", host), ("Authorization", &bearer)],
        )
    };
    assert_eq!(raw(addr, &as_host("gateway.test:8080")).await.status, 200);
    assert_eq!(raw(addr, &as_host("evil.example")).await.status, 421);
    let cross = head(
        "POST",
        CHAT,
        &[("Host", "127.0.0.1"), ("Origin", "http://evil.example")],
    );
    assert_eq!(raw(addr, &cross).await.status, 403);
    let dots = head("GET", "/openai/v1/%2e%2e/admin", &[("Host", "127.0.0.1")]);
    assert_eq!(raw(addr, &dots).await.status, 400);
    assert_eq!(provider.stats().total().requests, 0);

    // The timeouts: half a head is cut off, a missing body gets a 408.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"GET /keys HTTP/1.1\r\nHo").await.unwrap();
    assert!(read_until_closed(&mut stream, CUT_OFF).await.is_some());
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let post = format!("POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n");
    stream.write_all(post.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut stream, CUT_OFF).await.unwrap();
    assert_eq!(parse_raw(&answer).status, 408);

    // And the API itself.
    let (status, body) = post_chat(addr).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(provider.stats().total().requests, 1);
    // Once the forwarded request's line is written (log lines go out in batches), no line
    // holds the token.
    let logs = logged(&running, "forwarded").await;
    assert!(!logs.contains(TOKEN), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stops_when_told() {
    let layer = KeyFallbackLayer::new(KeySet::new(["gsk_gateway_stop_key"]).unwrap());
    let (upstream, _) = echo_upstream().await;
    let base = gateway::parse_upstream(&format!("http://{upstream}")).unwrap();
    let app = gateway::app(base, layer, &settings());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        gateway::serve(listener, app, &settings(), shutdown).await
    });
    let (status, _, body) = request(addr, "GET", "/keys", &[]).await;
    assert_eq!(status, 200, "{body}");

    stop.send(()).unwrap();
    timeout(WAIT, server)
        .await
        .expect("serve returns once told to stop")
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}

/// The gateway names each request's bucket from its `"model"`: a key limited on one model
/// keeps serving another, and a model whose limit is spent costs no further upstream call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_limited_on_one_model_serves_the_others_through_the_gateway() {
    let provider = FakeProvider::builder()
        .key(
            "gsk_models",
            Behavior::RateLimited {
                requests: 2,
                window: Duration::from_secs(60),
            },
        )
        .per_model()
        .build();
    let upstream = provider.serve_ephemeral().await.unwrap();
    let layer = KeyFallbackLayer::builder(
        KeySet::from_vars("GROQ_API_KEY", [("GROQ_API_KEY", "gsk_models")]).unwrap(),
    )
    .exhausted_response(true)
    .build();
    let handle = layer.handle();
    let base = gateway::parse_upstream(&upstream.url("")).unwrap();
    let setup = Setup {
        provider,
        _upstream: upstream,
        gateway: serve(gateway::app(base, layer, &settings())).await,
        client: Client::builder(TokioExecutor::new()).build_http(),
    };
    let body = |model: &str| full(format!(r#"{{"model":"{model}","messages":[]}}"#));
    for _ in 0..2 {
        let (status, _, text) = setup.call("POST", CHAT, body("busy")).await;
        assert_eq!(status, 200, "{text}");
    }
    // The second answer said none is left for "busy": the next is refused here, unsent.
    let (status, _, text) = setup.call("POST", CHAT, body("busy")).await;
    assert_eq!(status, 429, "{text}");
    assert_eq!(setup.provider.stats().total().rate_limited, 0);
    let (status, _, text) = setup.call("POST", CHAT, body("quiet")).await;
    assert_eq!(status, 200, "{text}");
    let status = handle.status();
    let buckets: Vec<_> = status.keys[0]
        .buckets
        .iter()
        .map(|b| (b.bucket.clone(), b.requests_remaining.map(|r| r.0)))
        .collect();
    assert_eq!(
        buckets,
        [
            (Some("busy".to_owned()), Some(0)),
            (Some("quiet".to_owned()), Some(1))
        ]
    );
}

#[cfg(feature = "redis")]
#[path = "support/redis.rs"]
mod redis_server;

/// Starts the gateway binary in front of `upstream` with the two keys of
/// `two_gateways_share_their_keys_state_through_redis`, sharing through `redis` if given.
#[cfg(feature = "redis")]
fn replica(bin: &PathBuf, upstream: &FakeServer, redis: Option<&str>) -> Running {
    let mut command = Command::new(bin);
    command
        .args(["--listen", "127.0.0.1:0", "--keys-env", "GATEWAY_TEST_KEY"])
        .env("UPSTREAM_URL", upstream.url(""))
        .env("GATEWAY_TEST_KEY", "gsk_replica_spent")
        .env("GATEWAY_TEST_KEY_2", "gsk_replica_good");
    clear_gateway_env(&mut command);
    if let Some(url) = redis {
        command
            .env("REDIS_URL", url)
            .args(["--redis-namespace", "replicas"]);
    }
    launch(command)
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_their_keys_state_through_redis() {
    let bin = gateway_binary();
    let redis = redis_server::RedisServer::start();
    let provider = FakeProvider::builder()
        .key("gsk_replica_spent", Behavior::QuotaExhausted)
        .key("gsk_replica_good", Behavior::Ok)
        .build();
    let upstream = provider.serve_ephemeral().await.unwrap();
    let spent = || provider.stats().key("gsk_replica_spent").requests;

    let one = replica(&bin, &upstream, Some(&redis.url()));
    let two = replica(&bin, &upstream, Some(&redis.url()));
    assert!(one
        .banner
        .contains("sharing key state through Redis, namespace replicas"));
    assert!(!one.banner.contains(&redis.url()), "{}", one.banner);
    // The first gateway learns the key is out of quota; the second knows it before it is
    // asked anything.
    assert_eq!(post_chat(one.addr).await.0, 200);
    assert_eq!(spent(), 1);
    let deadline = Instant::now() + WAIT;
    loop {
        let keys = get_keys(two.addr).await;
        if keys["keys"][0]["state"] == "cooling_down" {
            assert_eq!(keys["keys"][0]["reason"], "quota_exhausted", "{keys}");
            break;
        }
        assert!(Instant::now() < deadline, "not shared: {keys}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..10 {
        assert_eq!(post_chat(two.addr).await.0, 200);
    }
    assert_eq!(spent(), 1, "the second gateway called the spent key");

    // A restart: both stop, a new one starts and calls the spent key no more.
    drop((one, two));
    let three = replica(&bin, &upstream, Some(&redis.url()));
    for _ in 0..10 {
        assert_eq!(post_chat(three.addr).await.0, 200);
    }
    let with_redis = spent();
    drop(three);

    // Without Redis, the same 10 + restart + 10 calls it once per process.
    let before = spent();
    for _ in 0..2 {
        let alone = replica(&bin, &upstream, None);
        for _ in 0..10 {
            assert_eq!(post_chat(alone.addr).await.0, 200);
        }
    }
    let without = spent() - before;
    println!(
        "restart (the spent key, 10 requests, restart, 10 more): called {with_redis} time(s) \
         in all with Redis, {without} without"
    );
    assert_eq!(with_redis, 1);
    assert_eq!(without, 2);
}

/// With client tokens set, `/openai/v1/*` needs one of them (401 otherwise, before anything is
/// forwarded), and the token never goes upstream: the pool's key replaces it. Without tokens,
/// only loopback peers are served. `/healthz` and `/readyz` need neither.
#[tokio::test]
async fn client_tokens_guard_the_api_and_never_go_upstream() {
    use tower::ServiceExt;
    let (upstream, seen) = echo_upstream().await;
    let base = gateway::parse_upstream(&format!("http://{upstream}")).unwrap();
    let layer = || KeyFallbackLayer::new(KeySet::new(["gsk_gateway_client_key"]).unwrap());
    let with_tokens = gateway::Settings {
        clients: gateway::Clients::from_list("GATEWAY_CLIENT_TOKENS", "tok-one, tok-two").unwrap(),
        ..settings()
    };
    let addr = serve_with(
        gateway::app(base.clone(), layer(), &with_tokens),
        &with_tokens,
    )
    .await;
    for auth in [
        None,
        Some("Bearer tok-three"),
        Some("Bearer gsk_gateway_client_key"),
        Some("Basic tok-one"),
        Some("Bearer "),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        let (status, head, body) = request(addr, "POST", "/openai/v1/models", &headers).await;
        assert_eq!(status, 401, "{auth:?}: {body}");
        assert!(body.contains("gateway_token_required"), "{body}");
        assert!(head.contains_key("www-authenticate"), "{head:?}");
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        0,
        "nothing refused was forwarded"
    );
    for token in ["tok-one", "tok-two"] {
        let auth = format!("Bearer {token}");
        let (status, _, echoed) = request(
            addr,
            "POST",
            "/openai/v1/models",
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!(status, 200, "{echoed}");
        // What the upstream received: the pool's key, not the client's token.
        assert!(
            !echoed.contains("tok-"),
            "a client token went upstream: {echoed}"
        );
        assert!(
            echoed.contains("authorization: Bearer gsk_gateway_client_key"),
            "{echoed}"
        );
    }
    assert_eq!(seen.lock().unwrap().len(), 2);

    // A route of a configuration file, under its own prefix, is guarded the same way.
    let routes = vec![gateway::Route {
        name: Some("groq".to_owned()),
        prefix: "/groq".to_owned(),
        upstream: base.clone(),
        layer: layer(),
    }];
    let routed = serve_with(gateway::app_routes(routes, &with_tokens), &with_tokens).await;
    let (status, _, _) = request(routed, "POST", "/groq/chat/completions", &[]).await;
    assert_eq!(status, 401);
    let (status, _, echoed) = request(
        routed,
        "POST",
        "/groq/chat/completions",
        &[("authorization", "Bearer tok-two")],
    )
    .await;
    assert_eq!(status, 200, "{echoed}");
    assert!(echoed.starts_with("POST /chat/completions"), "{echoed}");

    // No token set: a peer elsewhere is refused, a loopback one served.
    let app = gateway::app(base, layer(), &settings());
    let from = |peer: &str| {
        let peer: SocketAddr = peer.parse().unwrap();
        let mut req = Request::post("/openai/v1/models")
            .header("host", "127.0.0.1")
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let app = app.clone();
        async move { timeout(WAIT, app.oneshot(req)).await.unwrap().unwrap() }
    };
    assert_eq!(from("192.0.2.7:40000").await.status(), 403);
    assert_eq!(from("[2001:db8::7]:1").await.status(), 403);
    assert_eq!(from("127.0.0.1:40000").await.status(), 200);

    // Health needs no token.
    let (status, _, body) = request(addr, "GET", "/healthz", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, r#"{"status":"ok"}"#);
    let (status, _, body) = request(addr, "GET", "/readyz", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, r#"{"status":"ready","usable_keys":1}"#);
}

/// `/readyz` answers 503 once no key can serve, and 200 again after a reset.
#[tokio::test]
async fn readyz_follows_the_keys() {
    let setup = start(&[("GROQ_API_KEY", "gsk_ready_dead", Behavior::InvalidKey)]).await;
    let (status, _, body) = request(setup.gateway, "GET", "/readyz", &[]).await;
    assert_eq!(status, 200, "{body}");
    let res = setup.send("POST", CHAT, full(chat_body(false))).await;
    assert_eq!(res.status(), 429);
    let (status, _, body) = request(setup.gateway, "GET", "/readyz", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body, r#"{"status":"not_ready","usable_keys":0}"#);
    let (status, _, _) = request(setup.gateway, "POST", "/keys/reset", &[]).await;
    assert_eq!(status, 200);
    let (status, _, body) = request(setup.gateway, "GET", "/readyz", &[]).await;
    assert_eq!(status, 200, "{body}");
}

/// SIGTERM: the binary stops accepting connections, lets a stream under way finish, then
/// exits with 0: on one thread (the default) and on several (the multi-thread runtime, where
/// the gateway runs as a task).
#[tokio::test]
async fn sigterm_lets_streams_in_flight_finish_then_exits() {
    sigterm_run(&[]).await;
    sigterm_run(&["--threads", "2"]).await;
}

async fn sigterm_run(more_args: &[&str]) {
    let provider = FakeProvider::builder()
        .key("gsk_term_key", Behavior::Ok)
        .stream_interval(Duration::from_millis(150))
        .build();
    let upstream = provider.serve_ephemeral().await.unwrap();
    let mut command = Command::new(gateway_binary());
    command
        .args(["--listen", "127.0.0.1:0", "--keys-env", "GATEWAY_TERM_KEY"])
        .args(more_args)
        .env("UPSTREAM_URL", upstream.url(""))
        .env("GATEWAY_TERM_KEY", "gsk_term_key");
    clear_gateway_env(&mut command);
    let mut running = launch(command);
    let addr = running.addr;

    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://{addr}{CHAT}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat_body(true))))
        .unwrap();
    let res = timeout(WAIT, client.request(req)).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    // The first event is in: the stream is under way.
    let first = timeout(WAIT, body.frame()).await.unwrap().unwrap().unwrap();
    let mut text = String::from_utf8_lossy(first.data_ref().unwrap()).into_owned();

    let pid = running.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    // The stream goes on to its end.
    while let Some(frame) = timeout(WAIT, body.frame()).await.unwrap() {
        if let Ok(data) = frame.unwrap().into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(text.contains("data: [DONE]"), "{text}");
    // Then the process exits by itself, with 0, and takes no new connection.
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = running.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        status.success(),
        "{status:?}: {}",
        running.stderr.lock().unwrap()
    );
    assert!(TcpStream::connect(addr).await.is_err());
}

/// Every forwarded request has an id: the client's `x-request-id` (kept when it is sane) or
/// one made here; it goes upstream, comes back when the upstream sent none, and is in the log
/// line, which `GATEWAY_LOG_FORMAT=json` writes as one JSON object.
#[tokio::test]
async fn request_ids_go_upstream_and_into_json_logs() {
    let (upstream, _) = echo_upstream().await;
    let base = gateway::parse_upstream(&format!("http://{upstream}")).unwrap();
    let layer = KeyFallbackLayer::new(KeySet::new(["gsk_gateway_id_key"]).unwrap());
    let addr = serve(gateway::app(base, layer, &settings())).await;
    let (status, head, echoed) = request(
        addr,
        "POST",
        "/openai/v1/models",
        &[("x-request-id", "client-id-42")],
    )
    .await;
    assert_eq!(status, 200);
    assert!(echoed.contains("x-request-id: client-id-42\n"), "{echoed}");
    assert_eq!(head["x-request-id"], "client-id-42");
    let too_long = "x".repeat(129);
    for sent in [None, Some("bad id"), Some(too_long.as_str())] {
        let headers: Vec<(&str, &str)> = sent.iter().map(|v| ("x-request-id", *v)).collect();
        let (_, head, echoed) = request(addr, "POST", "/openai/v1/models", &headers).await;
        let made = head["x-request-id"].to_str().unwrap().to_owned();
        assert!(made.starts_with("gw-") && made.len() == 27, "{made}");
        assert!(
            made[3..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{made}"
        );
        assert!(
            echoed.contains(&format!("x-request-id: {made}\n")),
            "{echoed}"
        );
    }
    let (_, a, _) = request(addr, "POST", "/openai/v1/models", &[]).await;
    let (_, b, _) = request(addr, "POST", "/openai/v1/models", &[]).await;
    assert_ne!(a["x-request-id"], b["x-request-id"]);
    // The process's prefix, then a counter: a later request's id is higher (other tests in
    // this process forward requests too, so not necessarily by one).
    let (a, b) = (
        a["x-request-id"].to_str().unwrap(),
        b["x-request-id"].to_str().unwrap(),
    );
    assert_eq!(a[..19], b[..19], "{a} {b}");
    let count = |id: &str| u32::from_str_radix(&id[19..], 16).unwrap();
    assert!(count(b) > count(a), "{a} {b}");

    // The binary's JSON logs.
    let provider = FakeProvider::builder()
        .key("gsk_log_key", Behavior::Ok)
        .build();
    let fake = provider.serve_ephemeral().await.unwrap();
    let mut command = Command::new(gateway_binary());
    command
        .args(["--listen", "127.0.0.1:0", "--keys-env", "GATEWAY_LOG_KEY"])
        .env("UPSTREAM_URL", fake.url(""))
        .env("GATEWAY_LOG_KEY", "gsk_log_key");
    clear_gateway_env(&mut command);
    command.env("GATEWAY_LOG_FORMAT", "json");
    let running = launch(command);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://{}{CHAT}", running.addr))
        .header("content-type", "application/json")
        .header("x-request-id", "trace-me-7")
        .body(Full::new(Bytes::from(chat_body(false))))
        .unwrap();
    let res = timeout(WAIT, client.request(req)).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    let logs = logged(&running, "trace-me-7").await;
    let line = logs.lines().find(|l| l.contains("trace-me-7")).unwrap();
    let entry: Value = serde_json::from_str(line).unwrap();
    assert_eq!(entry["fields"]["request_id"], "trace-me-7", "{line}");
    assert_eq!(entry["fields"]["status"], 200, "{line}");
    assert_eq!(entry["fields"]["message"], "forwarded", "{line}");
    // The binary's name, whichever of its files logs the line.
    assert_eq!(entry["target"], "key_fallback_gateway", "{line}");
    assert!(!line.contains("gsk_log_key"), "{line}");
}

/// The configuration file: routes with their presets and options, and every mistake named
/// with the file, the line and the problem, never a value of the file.
#[test]
fn the_config_file_names_file_line_and_problem() {
    let ok = gateway::parse_config(
        "gw.toml",
        r#"listen = "127.0.0.1:9090"

[routes.groq]
provider = "groq"

[routes.azure]
provider = "azure_openai"
path = "/v1/azure"
keys_env = "AZURE_KEY"
upstream = "https://r.openai.azure.com/openai/"
max_attempts = 2
round_robin = true
wait_for_key = "5s"
groups = [["AZURE_KEY", "AZURE_KEY_2"]]
"#,
    )
    .unwrap();
    assert_eq!(
        ok.listen,
        Some(("gw.toml:1".to_owned(), "127.0.0.1:9090".to_owned()))
    );
    let names: Vec<_> = ok.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["azure", "groq"]);
    let (azure, groq) = (&ok.routes[0], &ok.routes[1]);
    assert_eq!(groq.path, "/groq");
    assert_eq!(groq.keys_env, "GROQ_API_KEY");
    assert_eq!(groq.upstream, "https://api.groq.com/openai/v1");
    assert_eq!(azure.path, "/v1/azure");
    assert_eq!(azure.upstream, "https://r.openai.azure.com/openai");
    assert_eq!(azure.max_attempts, Some(2));
    assert!(azure.round_robin);
    assert_eq!(azure.wait_for_key, Some(Duration::from_secs(5)));
    assert_eq!(azure.groups, [["AZURE_KEY", "AZURE_KEY_2"]]);
    assert_eq!(azure.at, "gw.toml:6");

    let secret = "gsk_SECRET_in_the_wrong_place";
    let cases: [(String, &str, &str); 10] = [
        (
            "[routes.groq]\nprovider = \"groq\"\nmax_atempts = 2\n".to_owned(),
            "gw.toml:3:",
            "unknown field `max_atempts`",
        ),
        (
            format!("[routes.groq]\nprovider = \"groq\"\nmax_attempts = \"{secret}\"\n"),
            "gw.toml:3:",
            "invalid type",
        ),
        (
            format!("[routes.groq]\n\nprovider = \"{secret}\"\n"),
            "gw.toml:3:",
            "unknown provider",
        ),
        (
            "[routes.a]\nprovider = \"groq\"\n[routes.b]\nprovider = \"groq\"\npath = \"/a\"\n"
                .to_owned(),
            "gw.toml:3:",
            "serves /a, which route a (gw.toml:1) serves too",
        ),
        (
            "[routes.az]\nprovider = \"azure_openai\"\n".to_owned(),
            "gw.toml:1:",
            "has no fixed address",
        ),
        (
            format!("[routes.groq]\nprovider = \"groq\"\nwait_for_key = \"{secret}\"\n"),
            "gw.toml:3:",
            "wait_for_key is a time",
        ),
        (
            format!("[routes.groq]\nprovider = \"groq\"\npath = \"/../{secret}\"\n"),
            "gw.toml:3:",
            "path is `/` and segments",
        ),
        (
            "[routes.k]\nprovider = \"groq\"\npath = \"/keys\"\n".to_owned(),
            "gw.toml:1:",
            "is the gateway's own",
        ),
        (
            "listen = \"x\"\nroutez = 1\n".to_owned(),
            "gw.toml:2:",
            "unknown field `routez`",
        ),
        (
            "listen = \"127.0.0.1:1\"\n".to_owned(),
            "gw.toml:",
            "no route",
        ),
    ];
    for (text, at, problem) in cases {
        let err = gateway::parse_config("gw.toml", &text).unwrap_err();
        assert!(err.starts_with(at), "{err} (for {text:?})");
        assert!(err.contains(problem), "{err} (for {text:?})");
        assert!(!err.contains("SECRET"), "a value of the file in: {err}");
    }
}

/// The binary with a configuration file: two routes, each to its own upstream with its own
/// keys; `/keys`, `/readyz` and `/metrics` cover both; a missing key variable stops it at start
/// with the file and line.
#[tokio::test]
async fn the_binary_serves_the_routes_of_its_config_file() {
    let first = FakeProvider::builder()
        .key("gsk_route_a", Behavior::Ok)
        .build();
    let second = FakeProvider::builder()
        .key("gsk_route_b_dead", Behavior::InvalidKey)
        .key("gsk_route_b", Behavior::Ok)
        .build();
    let (up_a, up_b) = (
        first.serve_ephemeral().await.unwrap(),
        second.serve_ephemeral().await.unwrap(),
    );
    let dir = std::env::temp_dir().join(format!("tkf-gw-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            r#"listen = "127.0.0.1:0"

[routes.fast]
provider = "groq"
keys_env = "ROUTE_A_KEY"
upstream = "{}"

[routes.other]
provider = "openai_compatible"
path = "/v1/other"
keys_env = "ROUTE_B_KEY"
upstream = "{}"
"#,
            up_a.url("/openai/v1"),
            up_b.url("/openai/v1")
        ),
    )
    .unwrap();
    let mut command = Command::new(gateway_binary());
    command
        .args(["--config", file.to_str().unwrap()])
        .env("ROUTE_A_KEY", "gsk_route_a")
        .env("ROUTE_B_KEY", "gsk_route_b_dead")
        .env("ROUTE_B_KEY_2", "gsk_route_b");
    clear_gateway_env(&mut command);
    let running = launch(command);
    assert!(
        running.banner.contains("route fast (groq): /fast/*"),
        "{}",
        running.banner
    );
    assert!(running
        .banner
        .contains("route other (openai_compatible): /v1/other/*"));

    for (path, provider, key) in [
        ("/fast/chat/completions", &first, "gsk_route_a"),
        ("/v1/other/chat/completions", &second, "gsk_route_b"),
    ] {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let req = Request::post(format!("http://{}{path}", running.addr))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(chat_body(false))))
            .unwrap();
        let res = timeout(WAIT, client.request(req)).await.unwrap().unwrap();
        assert_eq!(res.status(), 200, "{path}");
        assert!(provider.stats().key(key).served >= 1, "{path}");
    }
    assert_eq!(second.stats().key("gsk_route_b_dead").unauthorized, 1);
    assert_eq!(first.stats().key("gsk_route_b").requests, 0);

    let keys = get_keys(running.addr).await;
    assert_eq!(
        keys["routes"]["fast"]["keys"][0]["label"], "ROUTE_A_KEY",
        "{keys}"
    );
    assert_eq!(
        keys["routes"]["other"]["keys"][0]["state"], "disabled",
        "{keys}"
    );
    let (status, _, body) = request(running.addr, "GET", "/readyz", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        r#"{"status":"ready","usable_keys":{"fast":1,"other":1}}"#
    );
    let (status, _, text) = request(running.addr, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(
        text.contains(r#"pool="fast""#) && text.contains(r#"pool="other""#),
        "{text}"
    );
    drop(running);

    // A route whose keys are not set: the file, the line of the route, the variable.
    let mut command = Command::new(gateway_binary());
    command
        .args(["--config", file.to_str().unwrap()])
        .env("ROUTE_A_KEY", "gsk_route_a");
    clear_gateway_env(&mut command);
    command
        .env_remove("ROUTE_B_KEY")
        .env_remove("ROUTE_B_KEY_2");
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("gateway.toml:8: route other:"), "{stderr}");
    assert!(stderr.contains("ROUTE_B_KEY"), "{stderr}");
    assert!(!stderr.contains("gsk_"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The chromium binary for the status page's test, or a failure that says how to install it.
fn chromium() -> PathBuf {
    let candidates = [
        std::env::var("CHROMIUM").ok(),
        Some("/usr/bin/chromium".to_owned()),
        Some("/usr/bin/chromium-browser".to_owned()),
    ];
    candidates
        .into_iter()
        .flatten()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "the status page is tested in headless Chromium, which is not installed: \
                 apt-get install -y chromium (or set CHROMIUM to its path)"
            )
        })
}

/// The page at `url` as headless Chromium renders it, after its script ran for a while.
fn rendered_dom(url: &str) -> String {
    let profile = std::env::temp_dir().join(format!(
        "tkf-chromium-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&profile);
    assert!(out.status.success(), "chromium: {:?}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The status page at `/`, in a real browser: every key with its state, reason and time to
/// recovery (a key cooling for its quota, counting down), the counters, and the switch the
/// gateway made, read from the rendered DOM.
#[tokio::test]
async fn the_status_page_shows_a_cooling_key_with_its_countdown() {
    let provider = FakeProvider::builder()
        .key("gsk_page_spent", Behavior::QuotaExhausted)
        .key("gsk_page_good", Behavior::Ok)
        .build();
    let upstream = provider.serve_ephemeral().await.unwrap();
    let mut command = Command::new(gateway_binary());
    command
        .args(["--listen", "127.0.0.1:0", "--keys-env", "PAGE_KEY"])
        .env("UPSTREAM_URL", upstream.url(""))
        .env("PAGE_KEY", "gsk_page_spent")
        .env("PAGE_KEY_2", "gsk_page_good");
    clear_gateway_env(&mut command);
    let running = launch(command);
    let (status, body) = post_chat(running.addr).await;
    assert_eq!(status, 200, "{body}");

    let addr = running.addr;
    let dom = tokio::task::spawn_blocking(move || rendered_dom(&format!("http://{addr}/")))
        .await
        .unwrap();
    let row = |label: &str| {
        let start = dom
            .find(&format!(r#"data-label="{label}""#))
            .unwrap_or_else(|| panic!("no row for {label} in:\n{dom}"));
        let end = dom[start..].find("</tr>").map_or(dom.len(), |e| start + e);
        dom[start..end].to_owned()
    };
    let spent = row("PAGE_KEY");
    assert!(spent.contains(r#"data-state="cooling_down""#), "{spent}");
    assert!(spent.contains("cooling down"), "{spent}");
    assert!(spent.contains("quota_exhausted"), "{spent}");
    // An hour's quota cooldown, counting down: "59 min 5x s".
    assert!(spent.contains("59 min "), "{spent}");
    let good = row("PAGE_KEY_2");
    assert!(good.contains(r#"data-state="active""#), "{good}");
    assert!(dom.contains("1 of 2 keys usable"), "{dom}");
    assert!(
        dom.contains("PAGE_KEY → PAGE_KEY_2 (quota_exhausted)"),
        "{dom}"
    );
    assert!(!dom.contains("gsk_"), "a key on the page:\n{dom}");
}

/// The log's lines wait in one batch: written whole when a warning comes (after the lines
/// before it, in order), when the batch is full, or when flushed (as at the gateway's stop),
/// and never one `write` per line. (The binary's thread writes it by time too, at most
/// `FLUSH_EVERY` after its first line; `BatchedLog::new` has no such thread.)
#[test]
fn log_lines_are_written_in_batches_in_order() {
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<String>>>);
    impl std::io::Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let text = String::from_utf8_lossy(buf).into_owned();
            self.0.lock().unwrap().push(text);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let writes = Writes::default();
    let log = gateway::logs::BatchedLog::new(Box::new(writes.clone()));
    let subscriber = tracing_subscriber::fmt()
        .with_writer(log.clone())
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .finish();
    let count = || writes.0.lock().unwrap().len();
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..100 {
            tracing::info!(i, "forwarded");
        }
        assert_eq!(count(), 0, "an info line waits for the batch");
        tracing::warn!("upstream unreachable");
        assert_eq!(
            count(),
            1,
            "a warning writes the batch and itself, in one write"
        );
        let first = writes.0.lock().unwrap()[0].clone();
        let lines: Vec<&str> = first.lines().collect();
        assert_eq!(lines.len(), 101, "{first}");
        for (i, line) in lines[..100].iter().enumerate() {
            assert!(line.ends_with(&format!("forwarded i={i}")), "{line}");
        }
        assert!(lines[100].contains("WARN") && lines[100].ends_with("upstream unreachable"));

        tracing::info!("after the warning");
        assert_eq!(count(), 1);
        log.flush();
        assert_eq!(count(), 2, "a flush writes what waits");
        assert!(writes.0.lock().unwrap()[1].ends_with("after the warning\n"));
        log.flush();
        assert_eq!(count(), 2, "nothing waits: no write");

        // A full batch is written without a flush.
        let long = "x".repeat(1000);
        let mut sent = 0;
        while count() == 2 {
            assert!(
                sent < 2 * gateway::logs::BATCH_BYTES / 1000,
                "never written"
            );
            tracing::info!(long, "forwarded");
            sent += 1;
        }
        assert!(sent >= gateway::logs::BATCH_BYTES / 1100, "{sent} lines");
        assert_eq!(writes.0.lock().unwrap()[2].lines().count(), sent);
    });
}

/// `logs::LineTime` writes what tracing-subscriber's `SystemTime` writes: read between two
/// readings of `SystemTime`, its text lies between theirs (the text is fixed-width, so it sorts
/// as the times do), across at least one change of second, when its kept part is made again.
#[test]
fn log_line_time_is_tracing_subscribers_time_formatted_once_a_second() {
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
    let format = |time: &dyn FormatTime| {
        let mut text = String::new();
        time.format_time(&mut Writer::new(&mut text)).unwrap();
        text
    };
    let first = format(&SystemTime);
    let started = Instant::now();
    let (mut seconds_seen, mut checked) = (0, 0);
    let mut last_second = first[..19].to_owned();
    while seconds_seen < 1
        && started.elapsed() < Duration::from_millis(2500)
        && checked < 10_000_000
    {
        let before = format(&SystemTime);
        let ours = format(&gateway::logs::LineTime);
        let after = format(&SystemTime);
        assert_eq!(ours.len(), before.len(), "{ours} {before}");
        assert!(before <= ours && ours <= after, "{before} {ours} {after}");
        assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.', "{ours}");
        if ours[..19] != last_second {
            seconds_seen += 1;
            last_second = ours[..19].to_owned();
        }
        checked += 1;
    }
    assert!(
        seconds_seen >= 1,
        "no change of second within 2.5 s ({checked} checked)"
    );
}
