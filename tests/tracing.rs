//! Tracing output: what is logged, and that no key ever is. Alone in its test binary, since
//! tracing caches per-callsite interest process-wide and other tests' threads would race it.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tokio::time::advance;
use tower::{Layer, Service, ServiceExt};
use tower_key_fallback::{KeyFallback, KeyFallbackLayer, KeyHandle, KeySet};
use tower_test::mock;

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;
type Mock = mock::Mock<Req, Res>;
type MockHandle = mock::Handle<Req, Res>;

fn keys(n: usize) -> KeySet {
    KeySet::new((1..=n).map(|i| format!("gsk_key{i}"))).unwrap()
}

fn setup(layer: KeyFallbackLayer) -> (KeyFallback<Mock>, MockHandle, KeyHandle) {
    let (mock, handle) = mock::pair::<Req, Res>();
    let keys = layer.handle();
    (layer.layer(mock), handle, keys)
}

fn request() -> Req {
    Request::post("https://api.groq.com/openai/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer caller-set")
        .header("x-api-key", "caller-set")
        .header("x-request-tag", "t1")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","messages":[]}"#,
        )))
        .unwrap()
}

fn response(status: u16, headers: &[(&str, &str)], body: &str) -> Res {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

const GROQ_429: &str = r#"{"error":{"message":"Rate limit reached for model `llama` in organization `org_x` service tier `on_demand` on requests per minute (RPM): Limit 30, Used 30, Requested 1. Please try again in 2s.","type":"requests","code":"rate_limit_exceeded"}}"#;
const INVALID_401: &str = r#"{"error":{"message":"Invalid API Key","type":"invalid_request_error","code":"invalid_api_key"}}"#;

/// The next upstream call; fails (rather than hangs) when none comes, e.g. because the
/// spawned request panicked. The paused clock jumps to the timeout only when all is idle.
async fn next<B>(
    handle: &mut mock::Handle<Request<B>, Res>,
) -> (Request<B>, mock::SendResponse<Res>) {
    tokio::time::timeout(Duration::from_secs(86_400 * 365), handle.next_request())
        .await
        .expect("an upstream call in time")
        .expect("the mock is alive")
}

fn bearer(req: &Req) -> String {
    let all: Vec<_> = req.headers().get_all("authorization").iter().collect();
    assert_eq!(all.len(), 1, "exactly one credential header");
    assert!(all[0].is_sensitive(), "credential marked sensitive");
    all[0].to_str().unwrap().to_owned()
}

/// Sends one request through `svc` and answers upstream calls in order with `answers`,
/// checking each carries the expected key. Returns the outcome.
async fn exchange(
    svc: &mut KeyFallback<Mock>,
    handle: &mut MockHandle,
    answers: Vec<(&str, Res)>,
) -> Result<Response<tower_key_fallback::KeyFallbackBody<Full<Bytes>>>, tower_key_fallback::BoxError>
{
    handle.allow(answers.len() as u64 + 1);
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(request()));
    for (key, res) in answers {
        let (req, send) = next(handle).await;
        assert_eq!(bearer(&req), format!("Bearer {key}"));
        send.send_response(res);
    }
    call.await.unwrap()
}

/// A writer for tracing output that tests can read back.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn tracing_reports_switches_disables_and_recoveries_by_label_never_by_key() {
    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let (mut svc, mut handle, keys) = setup(KeyFallbackLayer::new(self::keys(3)));
    exchange(
        &mut svc,
        &mut handle,
        vec![
            ("gsk_key1", response(429, &[("retry-after", "5")], GROQ_429)),
            ("gsk_key2", response(401, &[], INVALID_401)),
            ("gsk_key3", response(200, &[], "")),
        ],
    )
    .await
    .unwrap();
    advance(Duration::from_secs(5)).await;
    exchange(
        &mut svc,
        &mut handle,
        vec![("gsk_key1", response(200, &[], ""))],
    )
    .await
    .unwrap();
    keys.rotate("key-2", "gsk_rotated").unwrap();
    keys.disable("key-1").unwrap();
    keys.disable("key-2").unwrap();
    keys.disable("key-3").unwrap();
    let _ = exchange(&mut svc, &mut handle, vec![]).await.unwrap_err();

    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    for expected in [
        "switching API key",
        "from=\"key-1\"",
        "to=\"key-2\"",
        "reason=\"rate_limited\"",
        "API key cooling down",
        "cooldown_ms=5000",
        "API key disabled until reset",
        "reason=\"invalid_key\"",
        "API key recovered from cooldown",
        "API key rotated",
        "no API key is usable",
        "sending request",
        "fp:",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert!(
        !text.contains("gsk_"),
        "a key leaked into the logs:\n{text}"
    );
}
