//! Feature `metrics`: [`MetricsEvents`], an observer that turns the layer's events into
//! counters, gauges and histograms of the [`metrics`](https://docs.rs/metrics) facade.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use ::metrics::{Counter, Gauge, Histogram, Label, Unit};
use arc_swap::ArcSwap;

use crate::classify::{ErrorVerdict, Verdict};
use crate::events::{KeyEvent, KeyEvents};
use crate::status::{CooldownReason, DisableReason, KeyState, PoolStatus};

const ATTEMPTS: &str = "key_fallback_attempts_total";
const COOLDOWNS: &str = "key_fallback_cooldowns_total";
const COOLDOWN_SECONDS: &str = "key_fallback_cooldown_seconds";
const BUCKET_COOLDOWNS: &str = "key_fallback_bucket_cooldowns_total";
const DISABLES: &str = "key_fallback_disables_total";
const RECOVERIES: &str = "key_fallback_recoveries_total";
const RESETS: &str = "key_fallback_resets_total";
const ROTATIONS: &str = "key_fallback_rotations_total";
const SWITCHES: &str = "key_fallback_switches_total";
const EXHAUSTED: &str = "key_fallback_exhausted_total";
const WAITS: &str = "key_fallback_waits_total";
const WAIT_SECONDS: &str = "key_fallback_wait_seconds";
const KEY_STATE: &str = "key_fallback_key_state";
const COOLDOWN_UNTIL: &str = "key_fallback_key_cooldown_until_timestamp_seconds";

/// The `verdict` label of an attempt: the answer's [`Verdict`], or the failed call's
/// [`ErrorVerdict`].
const VERDICTS: [&str; 10] = [
    "success",
    "drained",
    "rate_limited",
    "quota_exhausted",
    "invalid_key",
    "server_error",
    "request_fault",
    "transport_error",
    "connection_lost",
    "unreachable",
];

fn verdict_index(verdict: Verdict) -> usize {
    match verdict {
        Verdict::Success => 0,
        Verdict::Drained { .. } => 1,
        Verdict::RateLimited { .. } => 2,
        Verdict::QuotaExhausted { .. } => 3,
        Verdict::InvalidKey => 4,
        Verdict::ServerError => 5,
        Verdict::RequestFault => 6,
    }
}

fn error_index(verdict: ErrorVerdict) -> usize {
    match verdict {
        ErrorVerdict::KeyFailed => 7,
        ErrorVerdict::ConnectionLost => 8,
        ErrorVerdict::Unreachable => 9,
    }
}

/// The cooldown reasons, in the order of their slots.
const COOLDOWN_REASONS: [CooldownReason; 5] = [
    CooldownReason::RateLimited,
    CooldownReason::QuotaExhausted,
    CooldownReason::Drained,
    CooldownReason::Errors,
    CooldownReason::Manual,
];

fn cooldown_index(reason: CooldownReason) -> usize {
    match reason {
        CooldownReason::RateLimited => 0,
        CooldownReason::QuotaExhausted => 1,
        CooldownReason::Drained => 2,
        CooldownReason::Errors => 3,
        CooldownReason::Manual => 4,
    }
}

const DISABLE_REASONS: [DisableReason; 2] = [DisableReason::InvalidKey, DisableReason::Manual];

fn disable_index(reason: DisableReason) -> usize {
    match reason {
        DisableReason::InvalidKey => 0,
        DisableReason::Manual => 1,
    }
}

/// The reasons a request moves on to the next key ([`KeyEvent::Switched`]).
const SWITCH_REASONS: [&str; 8] = [
    "rate_limited",
    "quota_exhausted",
    "invalid_key",
    "server_error",
    "transport_error",
    "connection_lost",
    "waited",
    "other",
];

/// The `state` label of `key_fallback_key_state`.
const STATES: [&str; 4] = ["active", "probing", "cooling_down", "disabled"];
const ACTIVE: usize = 0;
const PROBING: usize = 1;
const COOLING: usize = 2;
const DISABLED: usize = 3;

/// An observer that records what the layer does as [`metrics`](https://docs.rs/metrics)
/// counters, gauges and histograms (feature `metrics`), for whichever recorder the program
/// installed: Prometheus (`metrics-exporter-prometheus`), StatsD, OpenTelemetry, …
///
/// Give it to [`KeyFallbackBuilder::events`](crate::KeyFallbackBuilder::events), paired
/// with [`TracingEvents`](crate::TracingEvents) to keep the logs:
///
/// ```
/// use tower_key_fallback::{KeyFallbackLayer, KeySet, MetricsEvents, TracingEvents};
///
/// let metrics = MetricsEvents::new().pool("groq");
/// let layer = KeyFallbackLayer::builder(KeySet::new(["gsk_a", "gsk_b"])?)
///     .events((TracingEvents, metrics.clone()))
///     .build();
/// // Every key's gauges from the start, not only once a request used it.
/// metrics.record_status(&layer.handle().status());
/// # Ok::<(), tower_key_fallback::ConfigError>(())
/// ```
///
/// # Metrics
///
/// Keys are named by their label (`GROQ_API_KEY_2`), never by the key. Every metric also has
/// the label `pool` when one was given with [`pool`](Self::pool), to tell apart several
/// pools in one process. Times are in seconds.
///
/// | name | type | labels | what |
/// |---|---|---|---|
/// | `key_fallback_attempts_total` | counter | `key`, `verdict` | upstream calls that were answered or failed, by what the answer meant: `success`, `drained`, `rate_limited`, `quota_exhausted`, `invalid_key`, `server_error`, `request_fault`, or for a call that failed without an answer `transport_error`, `connection_lost`, `unreachable` |
/// | `key_fallback_cooldowns_total` | counter | `key`, `reason` | keys set aside: `rate_limited`, `quota_exhausted`, `limit_reached`, `errors`, `manual` |
/// | `key_fallback_cooldown_seconds` | histogram | `reason` | how long each cooldown sets its key aside |
/// | `key_fallback_bucket_cooldowns_total` | counter | `key`, `reason` | keys set aside in one bucket (a model's own limit); the bucket is not a label, its values are the callers' |
/// | `key_fallback_disables_total` | counter | `key`, `reason` | keys disabled: `invalid_key`, `manual` |
/// | `key_fallback_recoveries_total` | counter | `key`, `reason` | keys back from a cooldown, by the cooldown's reason |
/// | `key_fallback_resets_total` | counter | `key` | keys made usable again by a reset |
/// | `key_fallback_rotations_total` | counter | `key` | keys replaced at run time |
/// | `key_fallback_switches_total` | counter | `key`, `reason` | requests moved from `key` to another key: `rate_limited`, `quota_exhausted`, `invalid_key`, `server_error`, `transport_error`, `connection_lost`, `waited` |
/// | `key_fallback_exhausted_total` | counter | | requests that no key could serve |
/// | `key_fallback_waits_total` | counter | `result` | waits for a key ([`wait_for_key`](crate::KeyFallbackBuilder::wait_for_key), probes) that ended: `got_key`, `gave_up` |
/// | `key_fallback_wait_seconds` | histogram | | how long those waits were |
/// | `key_fallback_key_state` | gauge | `key`, `state` | 1 for the key's state and 0 for the others: `active`, `probing` (half-open: back from a cooldown, or not heard from yet), `cooling_down`, `disabled` |
/// | `key_fallback_key_cooldown_until_timestamp_seconds` | gauge | `key` | when the key's cooldown ends, in seconds since the Unix epoch; 0 when it is not cooling down (remaining: `… - time()` in PromQL) |
///
/// A switch is counted under the key it moved away from only, not under the pair: the
/// series grow with the number of keys, not with its square, and `attempts_total` already
/// shows where the requests went.
///
/// # Cost
///
/// The handles of a key's metrics are registered once, when an event first names the key
/// (or at [`record_status`](Self::record_status)), and kept: an event then costs a lookup of
/// its key in a map read without a lock, and a counter increment. So install the recorder
/// before the first request; handles registered before would keep counting into the
/// recorder that was current then (by default none).
///
/// The gauges follow the events. A cooldown that has passed shows as `cooling_down` until
/// the pool notices it (at the next request); [`record_status`](Self::record_status) with a
/// fresh [`KeyHandle::status`](crate::KeyHandle::status) sets every key's gauges as they
/// are, e.g. before each scrape. With shared state (feature `redis`), what a replica learns
/// from the others counts here too: each replica counts a cooldown another one found.
#[derive(Clone)]
pub struct MetricsEvents {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Option<String>,
    /// Each key's handles, by label: read without a lock, replaced whole (under `adding`)
    /// when a key is first seen.
    keys: ArcSwap<HashMap<String, Arc<KeyMetrics>>>,
    adding: Mutex<()>,
    exhausted: OnceLock<Counter>,
    waits: [OnceLock<Counter>; 2],
    wait_seconds: OnceLock<Histogram>,
    cooldown_seconds: [OnceLock<Histogram>; 5],
}

/// One key's handles. The counters are registered when first counted, so that only what
/// happened shows; the gauges at once.
struct KeyMetrics {
    /// `pool` (if any) and `key`.
    labels: Vec<Label>,
    attempts: [OnceLock<Counter>; 10],
    cooldowns: [OnceLock<Counter>; 5],
    bucket_cooldowns: [OnceLock<Counter>; 5],
    disables: [OnceLock<Counter>; 2],
    recoveries: [OnceLock<Counter>; 5],
    switches: [OnceLock<Counter>; 8],
    resets: OnceLock<Counter>,
    rotations: OnceLock<Counter>,
    /// One gauge per state, and which is 1: written together, one writer at a time.
    state: Mutex<()>,
    states: [Gauge; 4],
    cooldown_until: Gauge,
}

impl fmt::Debug for MetricsEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsEvents")
            .field("pool", &self.inner.pool)
            .field("keys", &self.inner.keys.load().len())
            .finish()
    }
}

impl Default for MetricsEvents {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsEvents {
    /// An observer with no `pool` label.
    pub fn new() -> Self {
        MetricsEvents {
            inner: Arc::new(Inner::new(None)),
        }
    }

    /// Adds the label `pool="name"` to every metric, to tell this pool from the others in
    /// the process (`groq`, `openai`). Call it before cloning the observer: a clone taken
    /// before keeps its own metrics.
    pub fn pool(self, name: impl Into<String>) -> Self {
        MetricsEvents {
            inner: Arc::new(Inner::new(Some(name.into()))),
        }
    }

    /// Sets every key's gauges (`key_fallback_key_state`,
    /// `key_fallback_key_cooldown_until_timestamp_seconds`) from a status snapshot of the
    /// pool this observer watches: once after building, so that the keys not used yet show
    /// too, and before each scrape if a passed cooldown should show before the next request
    /// notices it.
    pub fn record_status(&self, status: &PoolStatus) {
        let now = SystemTime::now();
        for key in &status.keys {
            let m = self.inner.key(&key.label);
            match &key.state {
                KeyState::CoolingDown { remaining, .. } => {
                    m.set_state(COOLING, Some(now + *remaining));
                }
                KeyState::Disabled { .. } => m.set_state(DISABLED, None),
                KeyState::Active if key.probing.is_some() => m.set_state(PROBING, None),
                _ => m.set_state(ACTIVE, None),
            }
        }
    }
}

impl Inner {
    fn new(pool: Option<String>) -> Inner {
        Inner {
            pool,
            keys: ArcSwap::from_pointee(HashMap::new()),
            adding: Mutex::new(()),
            exhausted: OnceLock::new(),
            waits: Default::default(),
            wait_seconds: OnceLock::new(),
            cooldown_seconds: Default::default(),
        }
    }

    /// The labels every metric has: `pool`, if one was given.
    fn base(&self) -> Vec<Label> {
        self.pool
            .iter()
            .map(|p| Label::new("pool", p.clone()))
            .collect()
    }

    /// The handles of the key labelled `label`, made on first sight.
    #[inline]
    fn key(&self, label: &str) -> Arc<KeyMetrics> {
        if let Some(m) = self.keys.load().get(label) {
            return m.clone();
        }
        self.add(label)
    }

    #[cold]
    fn add(&self, label: &str) -> Arc<KeyMetrics> {
        let _one_at_a_time = self.adding.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.keys.load_full();
        if let Some(m) = current.get(label) {
            return m.clone();
        }
        describe();
        let mut labels = self.base();
        labels.push(Label::new("key", label.to_owned()));
        let m = Arc::new(KeyMetrics::new(labels));
        let mut next = HashMap::clone(&current);
        next.insert(label.to_owned(), m.clone());
        self.keys.store(Arc::new(next));
        m
    }

    fn pool_counter(
        &self,
        name: &'static str,
        extra: Option<(&'static str, &'static str)>,
    ) -> Counter {
        describe();
        let mut labels = self.base();
        if let Some((k, v)) = extra {
            labels.push(Label::new(k, v));
        }
        ::metrics::counter!(name, labels)
    }

    fn pool_histogram(
        &self,
        name: &'static str,
        extra: Option<(&'static str, &'static str)>,
    ) -> Histogram {
        describe();
        let mut labels = self.base();
        if let Some((k, v)) = extra {
            labels.push(Label::new(k, v));
        }
        ::metrics::histogram!(name, labels)
    }
}

impl KeyMetrics {
    fn new(labels: Vec<Label>) -> KeyMetrics {
        let states = STATES.map(|state| {
            let mut labels = labels.clone();
            labels.push(Label::new("state", state));
            ::metrics::gauge!(KEY_STATE, labels)
        });
        let cooldown_until = ::metrics::gauge!(COOLDOWN_UNTIL, labels.clone());
        KeyMetrics {
            labels,
            attempts: Default::default(),
            cooldowns: Default::default(),
            bucket_cooldowns: Default::default(),
            disables: Default::default(),
            recoveries: Default::default(),
            switches: Default::default(),
            resets: OnceLock::new(),
            rotations: OnceLock::new(),
            state: Mutex::new(()),
            states,
            cooldown_until,
        }
    }

    /// Adds one to the counter in `slot`, registered on first use with this key's labels
    /// and `extra`.
    #[inline]
    fn count(
        &self,
        slot: &OnceLock<Counter>,
        name: &'static str,
        extra: Option<(&'static str, &'static str)>,
    ) {
        slot.get_or_init(|| {
            let mut labels = self.labels.clone();
            if let Some((k, v)) = extra {
                labels.push(Label::new(k, v));
            }
            ::metrics::counter!(name, labels)
        })
        .increment(1);
    }

    /// Makes `state` the key's one state, with its cooldown's end if it is cooling down.
    fn set_state(&self, state: usize, until: Option<SystemTime>) {
        let _one_writer = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for (i, gauge) in self.states.iter().enumerate() {
            gauge.set(if i == state { 1.0 } else { 0.0 });
        }
        let until = until
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        self.cooldown_until.set(until);
    }
}

/// Tells the recorder what each metric is (its `# HELP` line, its unit). Recorders take a
/// description again as a no-op or an update; it is told when handles are registered.
fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        ATTEMPTS,
        Unit::Count,
        "Upstream calls answered or failed, by key and what the answer meant."
    );
    describe_counter!(COOLDOWNS, Unit::Count, "Keys set aside, by key and reason.");
    describe_histogram!(
        COOLDOWN_SECONDS,
        Unit::Seconds,
        "How long each cooldown sets its key aside, by reason."
    );
    describe_counter!(
        BUCKET_COOLDOWNS,
        Unit::Count,
        "Keys set aside in one bucket (a model's own limit), by key and reason."
    );
    describe_counter!(DISABLES, Unit::Count, "Keys disabled, by key and reason.");
    describe_counter!(
        RECOVERIES,
        Unit::Count,
        "Keys back from a cooldown, by key and the cooldown's reason."
    );
    describe_counter!(RESETS, Unit::Count, "Keys made usable again by a reset.");
    describe_counter!(ROTATIONS, Unit::Count, "Keys replaced at run time.");
    describe_counter!(
        SWITCHES,
        Unit::Count,
        "Requests moved from a key to the next one, by the key left and why."
    );
    describe_counter!(EXHAUSTED, Unit::Count, "Requests that no key could serve.");
    describe_counter!(WAITS, Unit::Count, "Waits for a key that ended, by result.");
    describe_histogram!(
        WAIT_SECONDS,
        Unit::Seconds,
        "How long waits for a key were."
    );
    describe_gauge!(
        KEY_STATE,
        "1 for each key's state (active, probing, cooling_down, disabled), 0 for the others."
    );
    describe_gauge!(
        COOLDOWN_UNTIL,
        Unit::Seconds,
        "When each key's cooldown ends, in seconds since the Unix epoch; 0 when not cooling down."
    );
}

impl KeyEvents for MetricsEvents {
    #[inline]
    fn on_event(&self, event: &KeyEvent<'_>) {
        let inner = &*self.inner;
        match *event {
            KeyEvent::Answered { key, verdict, .. } => {
                let i = verdict_index(verdict);
                let m = inner.key(key);
                m.count(&m.attempts[i], ATTEMPTS, Some(("verdict", VERDICTS[i])));
            }
            KeyEvent::CallFailed { key, verdict, .. } => {
                let i = error_index(verdict);
                let m = inner.key(key);
                m.count(&m.attempts[i], ATTEMPTS, Some(("verdict", VERDICTS[i])));
            }
            KeyEvent::Switched { from, reason, .. } => {
                let m = inner.key(from);
                let i = SWITCH_REASONS
                    .iter()
                    .position(|r| *r == reason)
                    .unwrap_or(SWITCH_REASONS.len() - 1);
                m.count(
                    &m.switches[i],
                    SWITCHES,
                    Some(("reason", SWITCH_REASONS[i])),
                );
            }
            KeyEvent::CooledDown {
                key,
                reason,
                duration,
                until,
                ..
            } => {
                let i = cooldown_index(reason);
                let m = inner.key(key);
                m.count(
                    &m.cooldowns[i],
                    COOLDOWNS,
                    Some(("reason", reason.as_str())),
                );
                m.set_state(COOLING, Some(until));
                inner.cooldown_seconds[i]
                    .get_or_init(|| {
                        inner.pool_histogram(
                            COOLDOWN_SECONDS,
                            Some(("reason", COOLDOWN_REASONS[i].as_str())),
                        )
                    })
                    .record(duration.as_secs_f64());
            }
            KeyEvent::BucketCooledDown { key, reason, .. } => {
                let i = cooldown_index(reason);
                let m = inner.key(key);
                m.count(
                    &m.bucket_cooldowns[i],
                    BUCKET_COOLDOWNS,
                    Some(("reason", reason.as_str())),
                );
            }
            KeyEvent::Disabled { key, reason, .. } => {
                let i = disable_index(reason);
                let m = inner.key(key);
                m.count(
                    &m.disables[i],
                    DISABLES,
                    Some(("reason", DISABLE_REASONS[i].as_str())),
                );
                m.set_state(DISABLED, None);
            }
            KeyEvent::Recovered { key, after, .. } => {
                let i = cooldown_index(after);
                let m = inner.key(key);
                m.count(
                    &m.recoveries[i],
                    RECOVERIES,
                    Some(("reason", after.as_str())),
                );
                m.set_state(PROBING, None);
            }
            KeyEvent::Opened { key, .. } => inner.key(key).set_state(ACTIVE, None),
            KeyEvent::Reset { key, .. } => {
                let m = inner.key(key);
                m.count(&m.resets, RESETS, None);
                m.set_state(PROBING, None);
            }
            KeyEvent::Rotated { key, .. } => {
                let m = inner.key(key);
                m.count(&m.rotations, ROTATIONS, None);
                m.set_state(PROBING, None);
            }
            KeyEvent::Exhausted { .. } => inner
                .exhausted
                .get_or_init(|| inner.pool_counter(EXHAUSTED, None))
                .increment(1),
            KeyEvent::Waited { waited, got_key } => {
                let (i, result) = if got_key {
                    (0, "got_key")
                } else {
                    (1, "gave_up")
                };
                inner.waits[i]
                    .get_or_init(|| inner.pool_counter(WAITS, Some(("result", result))))
                    .increment(1);
                inner
                    .wait_seconds
                    .get_or_init(|| inner.pool_histogram(WAIT_SECONDS, None))
                    .record(waited.as_secs_f64());
            }
            // Half-open already since `Recovered`, a reset or a rotation, but a key not heard
            // from since the start is first named here.
            KeyEvent::Probing { key, .. } => inner.key(key).set_state(PROBING, None),
            KeyEvent::ProbeReleased { .. } => {}
            KeyEvent::AttemptStarted { .. }
            | KeyEvent::Spending { .. }
            | KeyEvent::WindowReported { .. }
            | KeyEvent::Waiting { .. }
            | KeyEvent::SharedLimit { .. } => {}
        }
    }
}
