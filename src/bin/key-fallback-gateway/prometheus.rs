//! The gateway's `GET /metrics` (crate feature `metrics`): a `metrics` recorder that keeps
//! every series in memory and writes them in Prometheus' text format (version 0.0.4).
//!
//! Small on purpose: `metrics-exporter-prometheus` does this and more, but as a
//! dev-dependency it would be built with every example, `cargo run --example demo` included.
//! In a service of your own, use it (`PrometheusBuilder::install_recorder`, then
//! `PrometheusHandle::render` in the handler). Histograms are written as summaries without
//! quantiles (`_sum` and `_count`): enough for `rate(x_sum) / rate(x_count)`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};

/// What Prometheus is told a response of [`render`] is.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The process' recorder, if [`install`] installed it.
static RECORDER: OnceLock<Option<TextRecorder>> = OnceLock::new();

/// Installs the text recorder as the process' `metrics` recorder (the first call; later ones
/// say what it did). Returns whether it is the one in force: false when another recorder was
/// installed first, whose metrics [`render`] does not see.
pub fn install() -> bool {
    RECORDER
        .get_or_init(|| {
            let recorder = TextRecorder::default();
            metrics::set_global_recorder(recorder.clone())
                .is_ok()
                .then_some(recorder)
        })
        .is_some()
}

/// Every series recorded so far, as Prometheus text; empty without [`install`].
pub fn render() -> String {
    RECORDER
        .get()
        .and_then(Option::as_ref)
        .map(TextRecorder::render)
        .unwrap_or_default()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Summary,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Summary => "summary",
        }
    }
}

/// One value: a counter's count, a gauge's `f64` bits, or a summary's sum and count.
enum Value {
    Counter(Arc<AtomicU64>),
    Gauge(Arc<AtomicU64>),
    Summary(Arc<Summary>),
}

#[derive(Default)]
struct Summary(Mutex<(f64, u64)>);

impl HistogramFn for Summary {
    fn record(&self, value: f64) {
        let mut sum = self.0.lock().unwrap_or_else(|e| e.into_inner());
        sum.0 += value;
        sum.1 += 1;
    }
}

/// A metric's series, by their rendered labels.
struct Family {
    kind: Kind,
    series: BTreeMap<String, Value>,
}

#[derive(Clone, Default)]
struct TextRecorder {
    families: Arc<Mutex<BTreeMap<String, Family>>>,
    help: Arc<Mutex<BTreeMap<String, String>>>,
}

impl TextRecorder {
    fn describe(&self, key: KeyName, description: SharedString) {
        let mut help = self.help.lock().unwrap_or_else(|e| e.into_inner());
        help.insert(name(key.as_str()), description.into_owned());
    }

    /// The value of `key`'s series, made by `make` when it is new.
    fn register(&self, key: &Key, kind: Kind, make: impl FnOnce() -> Value) -> Value {
        let mut families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let family = families.entry(name(key.name())).or_insert_with(|| Family {
            kind,
            series: BTreeMap::new(),
        });
        let labels = labels(key);
        if family.kind != kind {
            // One name, two kinds: not valid Prometheus text. The second is not kept.
            return make();
        }
        let value = family.series.entry(labels).or_insert_with(make);
        match value {
            Value::Counter(c) => Value::Counter(c.clone()),
            Value::Gauge(g) => Value::Gauge(g.clone()),
            Value::Summary(s) => Value::Summary(s.clone()),
        }
    }

    fn render(&self) -> String {
        let help = self.help.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for (name, family) in families.iter() {
            if let Some(text) = help.get(name) {
                let text = text.replace('\\', "\\\\").replace('\n', "\\n");
                let _ = writeln!(out, "# HELP {name} {text}");
            }
            let _ = writeln!(out, "# TYPE {name} {}", family.kind.name());
            for (labels, value) in &family.series {
                match value {
                    Value::Counter(c) => {
                        let _ = writeln!(out, "{name}{labels} {}", c.load(Ordering::Relaxed));
                    }
                    Value::Gauge(g) => {
                        let v = f64::from_bits(g.load(Ordering::Relaxed));
                        let _ = writeln!(out, "{name}{labels} {}", number(v));
                    }
                    Value::Summary(s) => {
                        let (sum, count) = *s.0.lock().unwrap_or_else(|e| e.into_inner());
                        let _ = writeln!(out, "{name}_sum{labels} {}", number(sum));
                        let _ = writeln!(out, "{name}_count{labels} {count}");
                    }
                }
            }
        }
        out
    }
}

impl Recorder for TextRecorder {
    fn describe_counter(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }
    fn describe_gauge(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }
    fn describe_histogram(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        match self.register(key, Kind::Counter, || Value::Counter(Arc::default())) {
            Value::Counter(c) => Counter::from_arc(c),
            _ => Counter::noop(),
        }
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        match self.register(key, Kind::Gauge, || Value::Gauge(Arc::default())) {
            Value::Gauge(g) => Gauge::from_arc(g),
            _ => Gauge::noop(),
        }
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        match self.register(key, Kind::Summary, || Value::Summary(Arc::default())) {
            Value::Summary(s) => Histogram::from_arc(s),
            _ => Histogram::noop(),
        }
    }
}

/// A metric or label name as Prometheus allows it: `[a-zA-Z_:][a-zA-Z0-9_:]*` (no `:` in
/// label names), anything else as `_`.
fn sanitize(raw: &str, colon: bool) -> String {
    let mut out: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn name(raw: &str) -> String {
    sanitize(raw, true)
}

/// `{a="1",b="2"}` in the key's order, values escaped; empty without labels.
fn labels(key: &Key) -> String {
    let mut out = String::new();
    for (i, label) in key.labels().enumerate() {
        out.push(if i == 0 { '{' } else { ',' });
        let value = label
            .value()
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(out, "{}=\"{value}\"", sanitize(label.key(), false));
    }
    if !out.is_empty() {
        out.push('}');
    }
    out
}

/// A sample value as Prometheus reads it.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        v.to_string()
    }
}
