//! Every provider preset against a real hyper server on 127.0.0.1 that answers with the
//! cases of tests/fixtures/provider-signals.json (status, headers, body as the providers sent
//! them): the first key gets the case, the second a success. Each preset must put the key
//! where its API takes it (and nowhere else), and give each case its verdict: the key's
//! state afterwards, and what the caller got back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_key_fallback::{
    CooldownReason, Credential, DisableReason, KeyFallbackLayer, KeyHandle, KeySet, KeyState,
    Provider,
};

/// Where a request carried a key, as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    /// `(place, value)` for every place that held a credential.
    credentials: Vec<(&'static str, String)>,
}

/// What the server answers to the first key.
#[derive(Clone)]
struct Case {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

fn credentials(req: &Request<Incoming>) -> Vec<(&'static str, String)> {
    let mut found = Vec::new();
    for name in ["authorization", "api-key", "x-api-key", "x-goog-api-key"] {
        for v in req.headers().get_all(name) {
            found.push((name, v.to_str().unwrap().to_owned()));
        }
    }
    for pair in req.uri().query().unwrap_or("").split('&') {
        if let Some(v) = pair.strip_prefix("key=") {
            found.push(("?key", v.to_owned()));
        }
    }
    found
}

/// Answers `case` to a request carrying `first` anywhere, a success to any other.
async fn serve(case: Case, first: &'static str) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let case = case.clone();
            let log = log.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let creds = credentials(&req);
                let hit = creds.iter().any(|(_, v)| v.contains(first));
                log.lock().unwrap().push(Seen { credentials: creds });
                let case = case.clone();
                async move {
                    let res = if hit {
                        let mut b = Response::builder().status(case.status);
                        for (k, v) in &case.headers {
                            b = b.header(k, v);
                        }
                        b.body(Full::new(Bytes::from(case.body)))
                    } else {
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(br#"{"ok":true}"#)))
                    };
                    Ok::<_, Infallible>(res.unwrap())
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Server { addr, seen }
}

fn fixture() -> Vec<Value> {
    serde_json::from_str(include_str!("fixtures/provider-signals.json")).unwrap()
}

/// The case's headers, leaving out the fixture's placeholders (`"(absent)"`, …).
fn case_of(value: &Value) -> Case {
    let headers = value["headers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .filter(|(_, v)| !v.starts_with('('))
        .collect();
    Case {
        status: value["status"].as_u64().unwrap() as u16,
        headers,
        body: value["body"].as_str().unwrap_or("").to_owned(),
    }
}

/// What the key that got the case should end as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    RateLimited,
    Quota,
    Invalid,
    ServerError,
    RequestFault,
}

fn want(case: &Value, preset: &str) -> Want {
    let status = case["status"].as_u64().unwrap();
    // Together answers 403 for a request longer than the context: never the key's fault.
    if preset == "together" && status == 403 {
        return Want::RequestFault;
    }
    match case["case"].as_str().unwrap() {
        "rate_limit" => Want::RateLimited,
        "quota" | "quota_daily" => Want::Quota,
        "request_too_large" | "blocked_edge" | "region_blocked" => Want::RequestFault,
        "invalid_key" | "revoked_key" | "permission_denied" | "account_restricted" => Want::Invalid,
        "overloaded" => Want::ServerError,
        other => panic!("unknown case {other}"),
    }
}

fn presets() -> Vec<(&'static str, Provider)> {
    vec![
        ("groq", Provider::groq()),
        ("openai", Provider::openai()),
        ("azure_openai", Provider::azure_openai("http://unused")),
        ("anthropic", Provider::anthropic()),
        ("gemini", Provider::gemini()),
        ("gemini?key", Provider::gemini().key_in_query()),
        ("openrouter", Provider::openrouter()),
        ("mistral", Provider::mistral()),
        ("together", Provider::together()),
        ("fireworks", Provider::fireworks()),
        ("deepseek", Provider::deepseek()),
        (
            "openai_compatible",
            Provider::openai_compatible("http://unused"),
        ),
    ]
}

/// Where the preset must put `key`, as [`credentials`] reports it.
fn placed(provider: &Provider, key: &str) -> (&'static str, String) {
    match provider.credential() {
        Credential::Bearer => ("authorization", format!("Bearer {key}")),
        Credential::Header(name) => match name.as_str() {
            "api-key" => ("api-key", key.to_owned()),
            "x-api-key" => ("x-api-key", key.to_owned()),
            "x-goog-api-key" => ("x-goog-api-key", key.to_owned()),
            other => panic!("unexpected header {other}"),
        },
        Credential::Query(name) => {
            assert_eq!(name, "key");
            ("?key", key.to_owned())
        }
        other => panic!("unexpected credential {other:?}"),
    }
}

type Svc = tower::util::BoxCloneSyncService<
    Request<Full<Bytes>>,
    Response<tower_key_fallback::KeyFallbackBody<Incoming>>,
    tower::BoxError,
>;

fn client(layer: KeyFallbackLayer) -> Svc {
    let client =
        Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(HttpConnector::new());
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(client)
        .map_err(Into::into);
    tower::util::BoxCloneSyncService::new(svc)
}

/// One request as a caller would send it, with its own credentials in every header (which
/// the layer must replace) and, for a preset that sends the key in the query, there too.
async fn send(svc: &mut Svc, addr: SocketAddr) -> (u16, Bytes) {
    send_to(svc, addr, "alt=sse").await
}

async fn send_to(svc: &mut Svc, addr: SocketAddr, query: &str) -> (u16, Bytes) {
    let req = Request::post(format!("http://{addr}/v1/chat/completions?{query}"))
        .header("authorization", "Bearer caller-key")
        .header("x-api-key", "caller-key")
        .header("api-key", "caller-key")
        .header("x-goog-api-key", "caller-key")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","messages":[]}"#,
        )))
        .unwrap();
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    let status = res.status().as_u16();
    (status, res.into_body().collect().await.unwrap().to_bytes())
}

fn state(handle: &KeyHandle, i: usize) -> KeyState {
    handle.status().keys[i].state.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_preset_reads_every_case_over_loopback() {
    let cases = fixture();
    assert_eq!(cases.len(), 40);
    let mut wrong = Vec::new();
    let mut runs = 0;
    for (name, provider) in presets() {
        for (n, value) in cases.iter().enumerate() {
            let case = case_of(value);
            let first = "first-key";
            let server = serve(case.clone(), first).await;
            let keys = KeySet::new([first, "second-key"]).unwrap();
            let layer = KeyFallbackLayer::builder(keys)
                .provider(provider.clone())
                .build();
            let handle = layer.handle();
            let mut svc = client(layer);
            let query = match provider.credential() {
                Credential::Query(_) => "alt=sse&key=caller-key",
                _ => "alt=sse",
            };
            let (status, body) = send_to(&mut svc, server.addr, query).await;
            runs += 1;
            let what = format!(
                "{name} case #{n} ({} {} {})",
                value["provider"], value["case"], case.status
            );

            // The key went where the preset says, the caller's nowhere.
            let seen = server.seen.lock().unwrap().clone();
            let expected: Vec<_> = [first, "second-key"]
                .iter()
                .take(seen.len())
                .map(|k| vec![placed(&provider, k)])
                .collect();
            let got: Vec<_> = seen.iter().map(|s| s.credentials.clone()).collect();
            if got != expected {
                wrong.push(format!("{what}: credentials {got:?}, want {expected:?}"));
                continue;
            }

            let want = want(value, name);
            let key_state = state(&handle, 0);
            let ok = match want {
                Want::RequestFault => {
                    seen.len() == 1
                        && status == case.status
                        && body == case.body.as_bytes()
                        && key_state == KeyState::Active
                }
                fault => {
                    let replayed =
                        seen.len() == 2 && status == 200 && body == br#"{"ok":true}"#[..];
                    let as_wanted = match (fault, &key_state) {
                        (Want::RateLimited, KeyState::CoolingDown { reason, .. }) => {
                            *reason == CooldownReason::RateLimited
                        }
                        (Want::Quota, KeyState::CoolingDown { reason, .. }) => {
                            *reason == CooldownReason::QuotaExhausted
                        }
                        (Want::Invalid, KeyState::Disabled { reason }) => {
                            *reason == DisableReason::InvalidKey
                        }
                        (Want::ServerError, KeyState::Active) => {
                            handle.status().keys[0].errors == 1
                        }
                        _ => false,
                    };
                    replayed && as_wanted
                }
            };
            if !ok {
                wrong.push(format!(
                    "{what}: want {want:?}, got status {status}, {} calls, key {key_state:?}",
                    seen.len()
                ));
            }
        }
    }
    println!("{runs} runs: 40 fixture cases through each of 12 presets over loopback HTTP");
    assert_eq!(runs, 40 * 12);
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// The cooldown of the first key after `case`, through `provider`.
async fn cooldown_after(provider: Provider, case: Case) -> (Duration, CooldownReason) {
    let server = serve(case, "first-key").await;
    let keys = KeySet::new(["first-key", "second-key"]).unwrap();
    let layer = KeyFallbackLayer::builder(keys)
        .provider(provider)
        .max_cooldown(Duration::from_secs(40 * 86_400))
        .build();
    let handle = layer.handle();
    let (status, _) = send(&mut client(layer), server.addr).await;
    assert_eq!(status, 200);
    match state(&handle, 0) {
        KeyState::CoolingDown { remaining, reason } => (remaining, reason),
        other => panic!("not cooling: {other:?}"),
    }
}

fn near(got: Duration, want: Duration) -> bool {
    got <= want && want - got < Duration::from_secs(5)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn gemini_per_day_quota_lasts_until_midnight_pacific_not_its_retry_delay() {
    let value = fixture()
        .into_iter()
        .find(|c| c["provider"] == "gemini" && c["case"] == "quota_daily")
        .unwrap();
    assert!(
        value["body"]
            .as_str()
            .unwrap()
            .contains(r#""retryDelay": "5s""#)
            || value["body"]
                .as_str()
                .unwrap()
                .contains(r#""retryDelay":"5s""#)
    );
    let (left, reason) = cooldown_after(Provider::gemini(), case_of(&value)).await;
    assert_eq!(reason, CooldownReason::QuotaExhausted);
    // Midnight in Los Angeles is 07:00 or 08:00 UTC, less than a day away.
    let end = (unix_now() + left.as_secs() + 3) % 86_400;
    assert!(left < Duration::from_secs(86_400), "{left:?}");
    assert!(
        (7 * 3600..7 * 3600 + 6).contains(&end) || (8 * 3600..8 * 3600 + 6).contains(&end),
        "ends {end} s after a UTC midnight"
    );
}

#[tokio::test]
async fn anthropic_spend_cap_lasts_until_the_date_it_names() {
    let value = fixture()
        .into_iter()
        .find(|c| c["provider"] == "anthropic" && c["case"] == "quota" && c["status"] == 429)
        .unwrap();
    let mut case = case_of(&value);
    // The fixture's date has passed: the same message, two days from the next UTC midnight.
    let at = (unix_now() / 86_400 + 3) * 86_400;
    // "Fri, 04 Dec 2026 00:00:00 GMT" as "2026-12-04".
    let date = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(at));
    let parts: Vec<&str> = date.split(' ').collect();
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = months.iter().position(|m| *m == parts[2]).unwrap() + 1;
    let stamp = format!("{}-{month:02}-{}", parts[3], parts[1]);
    case.body = case.body.replace("2026-09-01", &stamp);
    assert!(case
        .body
        .contains(&format!("regain access on {stamp} at 00:00 UTC")));
    let (left, reason) = cooldown_after(Provider::anthropic(), case).await;
    assert_eq!(reason, CooldownReason::QuotaExhausted);
    let want = Duration::from_secs(at - unix_now());
    assert!(near(left, want), "{left:?} vs {want:?}");
}

#[tokio::test]
async fn openrouter_reset_header_is_epoch_milliseconds() {
    let value = fixture()
        .into_iter()
        .find(|c| c["provider"] == "openrouter" && c["case"] == "quota_daily")
        .unwrap();
    let mut case = case_of(&value);
    let at_ms = (unix_now() + 3 * 3600) * 1000;
    for (k, v) in &mut case.headers {
        if k.eq_ignore_ascii_case("x-ratelimit-reset") {
            *v = at_ms.to_string();
        }
    }
    let (left, reason) = cooldown_after(Provider::openrouter(), case.clone()).await;
    assert_eq!(reason, CooldownReason::QuotaExhausted);
    assert!(near(left, Duration::from_secs(3 * 3600)), "{left:?}");
    // Other presets do not read the header (another API's `X-RateLimit-Reset` means other
    // things): the configured quota cooldown, an hour.
    let (left, _) = cooldown_after(Provider::groq(), case).await;
    assert!(near(left, Duration::from_secs(3600)), "{left:?}");
}

#[tokio::test]
async fn azure_long_retry_after_in_the_message_is_a_quota() {
    let value = fixture()
        .into_iter()
        .find(|c| c["provider"] == "azure_openai" && c["case"] == "quota_daily")
        .unwrap();
    let (left, reason) =
        cooldown_after(Provider::azure_openai("http://unused"), case_of(&value)).await;
    assert_eq!(reason, CooldownReason::QuotaExhausted);
    assert!(near(left, Duration::from_secs(86_400)), "{left:?}");
}

#[tokio::test]
async fn x_should_retry_false_hands_a_server_error_back_and_true_replays() {
    let five_hundred = Case {
        status: 500,
        headers: vec![("x-should-retry".into(), "false".into())],
        body: r#"{"error":{"message":"bad request shape","type":"server_error"}}"#.into(),
    };
    for (provider, replayed) in [(Provider::openai(), false), (Provider::mistral(), true)] {
        let server = serve(five_hundred.clone(), "first-key").await;
        let layer = KeyFallbackLayer::builder(KeySet::new(["first-key", "second-key"]).unwrap())
            .provider(provider)
            .build();
        let handle = layer.handle();
        let (status, body) = send(&mut client(layer), server.addr).await;
        let calls = server.seen.lock().unwrap().len();
        if replayed {
            assert_eq!((status, calls), (200, 2));
            assert_eq!(handle.status().keys[0].errors, 1);
        } else {
            assert_eq!((status, calls), (500, 1));
            assert_eq!(body, five_hundred.body.as_bytes());
            assert_eq!(handle.status().keys[0].errors, 0);
        }
    }
    let conflict = Case {
        status: 409,
        headers: vec![("x-should-retry".into(), "true".into())],
        body: r#"{"error":{"message":"lock timeout"}}"#.into(),
    };
    let server = serve(conflict, "first-key").await;
    let layer = KeyFallbackLayer::builder(KeySet::new(["first-key", "second-key"]).unwrap())
        .provider(Provider::anthropic())
        .build();
    let (status, _) = send(&mut client(layer), server.addr).await;
    assert_eq!((status, server.seen.lock().unwrap().len()), (200, 2));
}

#[tokio::test]
async fn gemini_query_key_is_replaced_on_each_attempt_and_encoded() {
    let limited = Case {
        status: 429,
        headers: vec![],
        body: r#"{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}"#.into(),
    };
    let server = serve(limited, "AIza-first").await;
    let layer = KeyFallbackLayer::builder(KeySet::new(["AIza-first", "AIza+second/="]).unwrap())
        .provider(Provider::gemini().key_in_query())
        .build();
    let (status, _) = send_to(&mut client(layer), server.addr, "key=caller&alt=sse&key=x").await;
    assert_eq!(status, 200);
    let seen = server.seen.lock().unwrap().clone();
    let queries: Vec<_> = seen.iter().map(|s| s.credentials.clone()).collect();
    assert_eq!(
        queries,
        vec![
            vec![("?key", "AIza-first".to_owned())],
            vec![("?key", "AIza%2Bsecond%2F%3D".to_owned())],
        ]
    );
}

#[test]
fn presets_name_their_variables_and_urls() {
    let table = [
        (
            Provider::groq(),
            "GROQ_API_KEY",
            "https://api.groq.com/openai/v1",
        ),
        (
            Provider::openai(),
            "OPENAI_API_KEY",
            "https://api.openai.com/v1",
        ),
        (
            Provider::anthropic(),
            "ANTHROPIC_API_KEY",
            "https://api.anthropic.com/v1",
        ),
        (
            Provider::gemini(),
            "GEMINI_API_KEY",
            "https://generativelanguage.googleapis.com/v1beta",
        ),
        (
            Provider::openrouter(),
            "OPENROUTER_API_KEY",
            "https://openrouter.ai/api/v1",
        ),
        (
            Provider::mistral(),
            "MISTRAL_API_KEY",
            "https://api.mistral.ai/v1",
        ),
        (
            Provider::together(),
            "TOGETHER_API_KEY",
            "https://api.together.xyz/v1",
        ),
        (
            Provider::fireworks(),
            "FIREWORKS_API_KEY",
            "https://api.fireworks.ai/inference/v1",
        ),
        (
            Provider::deepseek(),
            "DEEPSEEK_API_KEY",
            "https://api.deepseek.com/v1",
        ),
        (
            Provider::azure_openai("https://r.openai.azure.com/openai/"),
            "AZURE_OPENAI_API_KEY",
            "https://r.openai.azure.com/openai",
        ),
    ];
    for (p, var, url) in table {
        assert_eq!((p.env_prefix(), p.base_url()), (var, url), "{}", p.name());
    }
    let p = Provider::groq()
        .with_env_prefix("MY_GROQ")
        .with_base_url("http://127.0.0.1:9/v1");
    assert_eq!(
        (p.env_prefix(), p.base_url()),
        ("MY_GROQ", "http://127.0.0.1:9/v1")
    );
    // A missing variable is named, as `KeySet::from_env` names it.
    let err = Provider::groq()
        .with_env_prefix("TKF_TEST_NO_SUCH_PREFIX")
        .keys_from_env()
        .unwrap_err();
    assert!(err.to_string().contains("TKF_TEST_NO_SUCH_PREFIX"), "{err}");
}

/// With the Gemini preset's header credential, a caller's own `?key=` must not stay in the
/// URL beside `x-goog-api-key`: Gemini reads `?key=` too, so a client could have its (invalid)
/// key read and each pool key disabled for the 400 `API_KEY_INVALID`. (A review finding.)
#[tokio::test]
async fn gemini_header_preset_drops_the_callers_query_key() {
    let server = serve(
        Case {
            status: 200,
            headers: vec![],
            body: "{}".into(),
        },
        "first-key",
    )
    .await;
    let layer = KeyFallbackLayer::builder(KeySet::new(["first-key", "second-key"]).unwrap())
        .provider(Provider::gemini())
        .build();
    let (status, _) = send_to(&mut client(layer), server.addr, "alt=sse&key=caller-key").await;
    assert_eq!(status, 200);
    let seen = server.seen.lock().unwrap().clone();
    assert_eq!(
        seen[0].credentials,
        vec![("x-goog-api-key", "first-key".to_owned())]
    );
    // Other presets leave a `key` parameter alone: it is no credential to them.
    let layer = KeyFallbackLayer::builder(KeySet::new(["first-key", "second-key"]).unwrap())
        .provider(Provider::groq())
        .build();
    send_to(&mut client(layer), server.addr, "key=caller-key").await;
    let seen = server.seen.lock().unwrap().clone();
    assert_eq!(
        seen[1].credentials,
        vec![
            ("authorization", "Bearer first-key".to_owned()),
            ("?key", "caller-key".to_owned())
        ]
    );
}

/// `x-should-retry: true` must not turn a request fault that the body asserts (OpenAI's 429
/// "Request too large for …": the request's own size) into a server error, counted against
/// every key the request is replayed on: a client repeating an oversized request would set
/// every key aside for errors. (A review finding.)
#[test]
fn x_should_retry_true_does_not_blame_keys_for_a_request_too_large() {
    use tower_key_fallback::{Classify, Verdict};
    let mut headers = http::HeaderMap::new();
    headers.insert("x-should-retry", "true".parse().unwrap());
    let body = br#"{"error":{"message":"Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Requested 90000.","type":"tokens","code":"rate_limit_exceeded"}}"#;
    let verdict = Provider::openai().classifier().classify_body(
        http::StatusCode::TOO_MANY_REQUESTS,
        &headers,
        body,
    );
    assert_eq!(verdict, Verdict::RequestFault);
}
