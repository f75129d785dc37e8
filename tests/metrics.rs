//! `MetricsEvents` (feature `metrics`): what a real layer over mocks records, by exact name
//! and labels, into a recorder of this test's own (installed for the test's thread only).
#![cfg(feature = "metrics")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use tower_key_fallback::{KeyFallbackLayer, MetricsEvents, TracingEvents};

mod support;
use support::*;

/// Every series registered, by `name{label="value",…}` with the labels sorted.
#[derive(Default)]
struct Store {
    counters: BTreeMap<String, Arc<AtomicU64>>,
    gauges: BTreeMap<String, Arc<AtomicU64>>,
    histograms: BTreeMap<String, Arc<Samples>>,
    described: BTreeMap<String, Option<Unit>>,
}

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

#[derive(Clone, Default)]
struct TestRecorder(Arc<Mutex<Store>>);

fn series(key: &Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}=\"{}\"", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
        let mut store = self.0.lock().unwrap();
        store.described.insert(key.as_str().to_owned(), unit);
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
        let mut store = self.0.lock().unwrap();
        store.described.insert(key.as_str().to_owned(), unit);
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
        let mut store = self.0.lock().unwrap();
        store.described.insert(key.as_str().to_owned(), unit);
    }
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut store = self.0.lock().unwrap();
        Counter::from_arc(store.counters.entry(series(key)).or_default().clone())
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let mut store = self.0.lock().unwrap();
        Gauge::from_arc(store.gauges.entry(series(key)).or_default().clone())
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut store = self.0.lock().unwrap();
        Histogram::from_arc(store.histograms.entry(series(key)).or_default().clone())
    }
}

impl TestRecorder {
    /// Every counter that is not zero.
    fn counters(&self) -> BTreeMap<String, u64> {
        let store = self.0.lock().unwrap();
        store
            .counters
            .iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::SeqCst)))
            .filter(|(_, v)| *v > 0)
            .collect()
    }

    fn counter(&self, series: &str) -> u64 {
        let store = self.0.lock().unwrap();
        store
            .counters
            .get(series)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }

    fn gauge(&self, series: &str) -> Option<f64> {
        let store = self.0.lock().unwrap();
        store
            .gauges
            .get(series)
            .map(|g| f64::from_bits(g.load(Ordering::SeqCst)))
    }

    fn samples(&self, series: &str) -> Vec<f64> {
        let store = self.0.lock().unwrap();
        store
            .histograms
            .get(series)
            .map_or_else(Vec::new, |h| h.0.lock().unwrap().clone())
    }

    /// The state gauges of `key` in pool `pool` that are 1.
    fn states(&self, pool: &str, key: &str) -> Vec<&'static str> {
        ["active", "cooling_down", "disabled", "probing"]
            .into_iter()
            .filter(|state| {
                let name = format!(
                    "key_fallback_key_state{{key=\"{key}\",pool=\"{pool}\",state=\"{state}\"}}"
                );
                let value = self
                    .gauge(&name)
                    .unwrap_or_else(|| panic!("{name} missing"));
                assert!(value == 0.0 || value == 1.0, "{name} = {value}");
                value == 1.0
            })
            .collect()
    }

    /// Every series name, with its labels.
    fn all_series(&self) -> Vec<String> {
        let store = self.0.lock().unwrap();
        store
            .counters
            .keys()
            .chain(store.gauges.keys())
            .chain(store.histograms.keys())
            .cloned()
            .collect()
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(start_paused = true)]
async fn a_layer_records_attempts_cooldowns_switches_disables_exhaustion_and_states() {
    let recorder = TestRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let metrics = MetricsEvents::new().pool("groq");
    let layer = KeyFallbackLayer::builder(keys(2))
        .events((TracingEvents, metrics.clone()))
        .build();
    let (mut svc, mut upstream, handle) = setup(layer);

    // Before any request, from a status snapshot: neither key has been heard from.
    metrics.record_status(&handle.status());
    assert_eq!(recorder.states("groq", "key-1"), ["probing"]);
    assert_eq!(recorder.states("groq", "key-2"), ["probing"]);
    assert!(recorder.counters().is_empty(), "{:?}", recorder.counters());

    // A success.
    exchange(&mut svc, &mut upstream, vec![("gsk_key1", ok())])
        .await
        .unwrap();
    assert_eq!(
        recorder.counters(),
        BTreeMap::from([(
            r#"key_fallback_attempts_total{key="key-1",pool="groq",verdict="success"}"#.to_owned(),
            1
        )])
    );
    assert_eq!(recorder.states("groq", "key-1"), ["active"]);

    // A 429 cools key 1 for 9 s and the request switches to key 2.
    let before = unix_now();
    exchange(
        &mut svc,
        &mut upstream,
        vec![("gsk_key1", limited("9")), ("gsk_key2", ok())],
    )
    .await
    .unwrap();
    assert_eq!(
        recorder.counters(),
        BTreeMap::from([
            (
                r#"key_fallback_attempts_total{key="key-1",pool="groq",verdict="success"}"#
                    .to_owned(),
                1
            ),
            (
                r#"key_fallback_attempts_total{key="key-1",pool="groq",verdict="rate_limited"}"#
                    .to_owned(),
                1
            ),
            (
                r#"key_fallback_attempts_total{key="key-2",pool="groq",verdict="success"}"#
                    .to_owned(),
                1
            ),
            (
                r#"key_fallback_cooldowns_total{key="key-1",pool="groq",reason="rate_limited"}"#
                    .to_owned(),
                1
            ),
            (
                r#"key_fallback_switches_total{key="key-1",pool="groq",reason="rate_limited"}"#
                    .to_owned(),
                1
            ),
        ])
    );
    assert_eq!(recorder.states("groq", "key-1"), ["cooling_down"]);
    assert_eq!(recorder.states("groq", "key-2"), ["active"]);
    assert_eq!(
        recorder.samples(r#"key_fallback_cooldown_seconds{pool="groq",reason="rate_limited"}"#),
        [9.0]
    );
    let until = recorder
        .gauge(r#"key_fallback_key_cooldown_until_timestamp_seconds{key="key-1",pool="groq"}"#)
        .unwrap();
    assert!(
        until >= before + 8.0 && until <= unix_now() + 10.0,
        "{until} is about 9 s from {before}"
    );
    assert_eq!(
        recorder
            .gauge(r#"key_fallback_key_cooldown_until_timestamp_seconds{key="key-2",pool="groq"}"#),
        Some(0.0)
    );

    // A 401 disables key 2; key 1 is cooling, so no key is left.
    let err = exchange(
        &mut svc,
        &mut upstream,
        vec![("gsk_key2", response(401, &[], INVALID_401))],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("no API key could serve"), "{err}");
    assert_eq!(
        recorder.counter(
            r#"key_fallback_attempts_total{key="key-2",pool="groq",verdict="invalid_key"}"#
        ),
        1
    );
    assert_eq!(
        recorder.counter(
            r#"key_fallback_disables_total{key="key-2",pool="groq",reason="invalid_key"}"#
        ),
        1
    );
    assert_eq!(
        recorder.counter(r#"key_fallback_exhausted_total{pool="groq"}"#),
        1
    );
    assert_eq!(recorder.states("groq", "key-2"), ["disabled"]);

    // A reset makes key 2 half-open again, not heard from.
    handle.reset("key-2").unwrap();
    assert_eq!(
        recorder.counter(r#"key_fallback_resets_total{key="key-2",pool="groq"}"#),
        1
    );
    assert_eq!(recorder.states("groq", "key-2"), ["probing"]);

    // Key 1's cooldown passes: the next request notices, probes it, and it serves.
    tokio::time::advance(Duration::from_secs(10)).await;
    exchange(&mut svc, &mut upstream, vec![("gsk_key1", ok())])
        .await
        .unwrap();
    assert_eq!(
        recorder.counter(
            r#"key_fallback_recoveries_total{key="key-1",pool="groq",reason="rate_limited"}"#
        ),
        1
    );
    assert_eq!(
        recorder
            .counter(r#"key_fallback_attempts_total{key="key-1",pool="groq",verdict="success"}"#),
        2
    );
    assert_eq!(recorder.states("groq", "key-1"), ["active"]);
    assert_eq!(
        recorder
            .gauge(r#"key_fallback_key_cooldown_until_timestamp_seconds{key="key-1",pool="groq"}"#),
        Some(0.0)
    );

    // Every metric said what it is, with seconds for times; no label holds a key.
    let store = recorder.0.lock().unwrap();
    for name in store
        .counters
        .keys()
        .chain(store.gauges.keys())
        .chain(store.histograms.keys())
        .map(|s| &s[..s.find('{').unwrap()])
    {
        assert!(store.described.contains_key(name), "{name} not described");
        if name.ends_with("_seconds") {
            assert_eq!(store.described[name], Some(Unit::Seconds), "{name}");
        }
    }
    drop(store);
    let all = recorder.all_series();
    assert!(all.len() > 10, "{all:?}");
    for series in all {
        assert!(!series.contains("gsk_"), "a key in {series}");
    }
}

#[tokio::test(start_paused = true)]
async fn failed_calls_count_by_their_verdict_and_pools_stay_apart() {
    let recorder = TestRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let groq = KeyFallbackLayer::builder(keys(2))
        .events(MetricsEvents::new().pool("groq"))
        .build();
    let openai = KeyFallbackLayer::builder(keys(1))
        .events(MetricsEvents::new().pool("openai"))
        .build();
    let (mut groq, mut groq_upstream, _) = setup(groq);
    let (mut openai, mut openai_upstream, _) = setup(openai);

    // A call that fails on the key's account moves on to the next key.
    groq_upstream.allow(2);
    let call = spawn(&mut groq, request()).await;
    let (key, _, reply) = upstream(&mut groq_upstream).await;
    assert_eq!(key, "Bearer gsk_key1");
    reply.send_error("boom");
    let (key, _, reply) = upstream(&mut groq_upstream).await;
    assert_eq!(key, "Bearer gsk_key2");
    reply.send_response(ok());
    call.await.unwrap().unwrap();

    exchange(&mut openai, &mut openai_upstream, vec![("gsk_key1", ok())])
        .await
        .unwrap();

    assert_eq!(
        recorder.counters(),
        BTreeMap::from([
            (
                r#"key_fallback_attempts_total{key="key-1",pool="groq",verdict="transport_error"}"#
                    .to_owned(),
                1
            ),
            (
                r#"key_fallback_attempts_total{key="key-1",pool="openai",verdict="success"}"#
                    .to_owned(),
                1
            ),
            (
                r#"key_fallback_attempts_total{key="key-2",pool="groq",verdict="success"}"#
                    .to_owned(),
                1
            ),
            (
                r#"key_fallback_switches_total{key="key-1",pool="groq",reason="transport_error"}"#
                    .to_owned(),
                1
            ),
        ])
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_pool_name_the_series_have_only_their_own_labels() {
    let recorder = TestRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let layer = KeyFallbackLayer::builder(keys(1))
        .events(MetricsEvents::new())
        .build();
    let (mut svc, mut upstream, handle) = setup(layer);
    handle.disable("key-1").unwrap();
    let err = exchange(&mut svc, &mut upstream, vec![]).await.unwrap_err();
    assert!(err.to_string().contains("no API key"), "{err}");
    assert_eq!(
        recorder.counters(),
        BTreeMap::from([
            (
                r#"key_fallback_disables_total{key="key-1",reason="manual"}"#.to_owned(),
                1
            ),
            ("key_fallback_exhausted_total{}".to_owned(), 1),
        ])
    );
    assert_eq!(
        recorder.gauge(r#"key_fallback_key_state{key="key-1",state="disabled"}"#),
        Some(1.0)
    );
}
