//! Tracing output: what is logged, and that no key ever is. Alone in its test binary, since
//! tracing caches per-callsite interest process-wide and other tests' threads would race it.

use std::time::Duration;

use tokio::time::advance;
use tower_key_fallback::KeyFallbackLayer;

mod support;
use support::*;

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
