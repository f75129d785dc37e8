//! The layer and its builder.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::budget::Lanes;
use crate::capacity::Limits;
use crate::classify::{Classify, DefaultClassifier};
use crate::config::{Config, Credential};
use crate::driver::Shared;
use crate::error::ConfigError;
use crate::events::{KeyEvents, Observer};
use crate::handle::KeyHandle;
use crate::keys::KeySet;
use crate::pool::Pool;
use crate::provider::Provider;
use crate::service::KeyFallback;

/// A [`Layer`] that runs each request over a pool of API keys, falling back to the next key
/// when one is rate limited, out of quota, rejected or failing.
///
/// Every service the layer makes shares one key pool; [`KeyFallbackLayer::handle`] gives a
/// [`KeyHandle`] on it.
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_key_fallback::{KeyFallbackLayer, KeySet};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_key_fallback::BoxError> {
/// // A stand-in for an HTTP client: key 1 is rate limited, key 2 works.
/// let client = service_fn(|req: Request<Full<Bytes>>| async move {
///     let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
///     let status = if auth == "Bearer gsk_one" { 429 } else { 200 };
///     Ok::<_, std::convert::Infallible>(
///         Response::builder().status(status).body(Full::new(Bytes::from("{}"))).unwrap(),
///     )
/// });
///
/// let layer = KeyFallbackLayer::new(KeySet::new(["gsk_one", "gsk_two"])?);
/// let handle = layer.handle();
/// let svc = ServiceBuilder::new().layer(layer).service(client);
///
/// let req = Request::post("https://api.groq.com/openai/v1/chat/completions")
///     .body(Full::new(Bytes::from(r#"{"model":"llama-3.1-8b-instant"}"#)))?;
/// let res = svc.oneshot(req).await?;
/// assert_eq!(res.status(), 200);
/// assert!(!handle.status().keys[0].is_available()); // key 1 is cooling down
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct KeyFallbackLayer {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for KeyFallbackLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFallbackLayer")
            .field("shared", &self.shared)
            .finish()
    }
}

impl KeyFallbackLayer {
    /// A layer with the defaults, which fit Groq and OpenAI-compatible APIs: bearer tokens,
    /// priority order, [`DefaultClassifier`].
    pub fn new(keys: KeySet) -> Self {
        Self::builder(keys).build()
    }

    /// A builder to change the defaults.
    pub fn builder(keys: KeySet) -> KeyFallbackBuilder {
        KeyFallbackBuilder::new(keys)
    }

    /// A builder with the keys of `provider`'s environment variables (`GROQ_API_KEY`,
    /// `GROQ_API_KEY_2`, … for [`Provider::groq`]) and its preset: how the key is sent and
    /// the signals of its answers.
    ///
    /// ```no_run
    /// use tower_key_fallback::{KeyFallbackLayer, Provider};
    ///
    /// let layer = KeyFallbackLayer::for_provider(Provider::anthropic())?.build();
    /// # Ok::<(), tower_key_fallback::ConfigError>(())
    /// ```
    pub fn for_provider(provider: Provider) -> Result<KeyFallbackBuilder, ConfigError> {
        Ok(Self::builder(provider.keys_from_env()?).provider(provider))
    }

    /// A handle on the key pool shared by every service this layer makes.
    pub fn handle(&self) -> KeyHandle {
        KeyHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S> Layer<S> for KeyFallbackLayer {
    type Service = KeyFallback<S>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyFallback::from_shared(inner, self.shared.clone())
    }
}

/// Builds a [`KeyFallbackLayer`]. Made by [`KeyFallbackLayer::builder`].
///
/// ```
/// use std::time::Duration;
/// use tower_key_fallback::{Credential, KeyFallbackLayer, KeySet};
///
/// let keys = KeySet::new(["sk-ant-a", "sk-ant-b"])?;
/// let layer = KeyFallbackLayer::builder(keys)
///     .credential(Credential::Header(http::HeaderName::from_static("x-api-key")))
///     .round_robin()
///     .max_attempts(2)
///     .error_threshold(5)
///     .rate_limit_cooldown(Duration::from_secs(30))
///     .build();
/// # Ok::<(), tower_key_fallback::ConfigError>(())
/// ```
pub struct KeyFallbackBuilder {
    keys: KeySet,
    classifier: Box<dyn Classify>,
    events: Observer,
    config: Config,
    limits: Limits,
    key_limits: Vec<(String, Limits)>,
    groups: Vec<Vec<String>>,
    #[cfg(feature = "redis")]
    store: Option<crate::store::RedisStore>,
}

impl fmt::Debug for KeyFallbackBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFallbackBuilder")
            .field("keys", &self.keys)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl KeyFallbackBuilder {
    fn new(keys: KeySet) -> Self {
        KeyFallbackBuilder {
            keys,
            classifier: Box::new(DefaultClassifier::new()),
            events: Observer::Tracing,
            config: Config::default(),
            limits: Limits::default(),
            key_limits: Vec::new(),
            groups: Vec::new(),
            #[cfg(feature = "redis")]
            store: None,
        }
    }

    /// Limits every key (or group) is known to have, so the pool paces from the first
    /// request instead of learning from 429s. What the provider reports overrides them
    /// while its report is current. Default: none.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Limits of the key labelled `label` (or of its group), instead of [`limits`](Self::limits).
    pub fn key_limits(mut self, label: impl Into<String>, limits: Limits) -> Self {
        self.key_limits.push((label.into(), limits));
        self
    }

    /// Keys (by label) that share one limit: made in one organization or project, as
    /// Groq's and OpenAI's limits are counted. A rate limit on one cools the group in that
    /// bucket, a spent quota cools the group, and budgets are counted for the group. The
    /// limits of a group are those of its first key.
    pub fn group<I, L>(mut self, labels: I) -> Self
    where
        I: IntoIterator<Item = L>,
        L: Into<String>,
    {
        self.groups
            .push(labels.into_iter().map(Into::into).collect());
        self
    }

    /// How the key goes on the request. Default: [`Credential::Bearer`]. Whatever the
    /// caller set in `Authorization`, `x-api-key`, `api-key`, `x-goog-api-key` or the named
    /// header is replaced.
    pub fn credential(mut self, credential: Credential) -> Self {
        self.config.credential = credential;
        self
    }

    /// Spreads requests over all usable keys in turn, instead of using the first usable
    /// key (priority order, the default).
    pub fn round_robin(mut self) -> Self {
        self.config.round_robin = true;
        self
    }

    /// The most upstream calls one request may make (each with a different key). Default:
    /// the number of keys. At least 1.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.config.max_attempts = Some(attempts.max(1));
        self
    }

    /// How much of an error body is read to classify it. Default: 64 KiB. The response
    /// handed back still carries every byte.
    pub fn body_inspect_limit(mut self, bytes: usize) -> Self {
        self.config.inspect_limit = bytes;
        self
    }

    /// How long reading an error body for classification may take. Default: 5 s. When it
    /// runs out (an upstream that sends a `429` head and then stalls), the key gets the
    /// verdict the head and the bytes read so far support, and the request moves on to the
    /// next key; a response handed back still carries every byte, read or not. The bound is
    /// a tokio timer: the runtime must have time enabled (`#[tokio::main]` and
    /// `Builder::enable_all` do).
    pub fn body_inspect_timeout(mut self, timeout: Duration) -> Self {
        self.config.inspect_timeout = timeout;
        self
    }

    /// The longest a provider can set a key aside for: every wait it gives (`Retry-After`,
    /// reset headers, hints in the body, drained successes) is capped at this, and
    /// [`KeyStatus::cooldown_capped`](crate::KeyStatus::cooldown_capped) says when it was.
    /// Default: 24 h. The configured cooldowns (`quota_cooldown`, …) are not capped.
    pub fn max_cooldown(mut self, max: Duration) -> Self {
        self.config.max_cooldown = max;
        self
    }

    /// Where what the layer does and learns is told (attempts, verdicts, cooldowns,
    /// disables, recoveries, resets, rotations, exhaustion). Default: [`TracingEvents`](crate::TracingEvents),
    /// which logs them; `(TracingEvents, yours)` keeps the logs and adds yours.
    pub fn events(mut self, events: impl KeyEvents) -> Self {
        self.events = Observer::Custom(Box::new(events));
        self
    }

    /// Shares the keys' state with every replica through Redis (feature `redis`): what one
    /// learns (cooldowns, disables, resets), the others know within milliseconds, and a
    /// replica that starts loads what is current. Requests never wait on Redis. See
    /// [`RedisStore`](crate::RedisStore).
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn shared_state(mut self, store: crate::store::RedisStore) -> Self {
        self.store = Some(store);
        self
    }

    /// A provider's preset ([`Provider`]): sets the [`credential`](Self::credential) and the
    /// [`classifier`](Self::classifier), which later calls may change again.
    pub fn provider(mut self, provider: Provider) -> Self {
        let (credential, classifier, strip_query) = provider.into_parts();
        self.config.strip_query = strip_query.map(str::to_owned);
        self.credential(credential).classifier(classifier)
    }

    /// How responses are classified. Default: [`DefaultClassifier`].
    pub fn classifier(mut self, classifier: impl Classify) -> Self {
        self.classifier = Box::new(classifier);
        self
    }

    /// When no key can serve a request, answer `429 Too Many Requests` with `Retry-After`
    /// instead of failing with [`Exhausted`](crate::Exhausted); or `502 Bad Gateway` when the
    /// last attempt could not reach the upstream at all (a timeout, a connection error). For
    /// proxies.
    pub fn exhausted_response(mut self, enabled: bool) -> Self {
        self.config.exhausted_response = enabled;
        self
    }

    /// Whether errors of the inner service (timeouts, connection errors) count against the
    /// key and move the request to the next key. Default: true. When false they are returned
    /// to the caller at once.
    pub fn fallback_on_transport_errors(mut self, enabled: bool) -> Self {
        self.config.fallback_on_transport_errors = enabled;
        self
    }

    /// Server or transport errors in a row after which a key is set aside. Default: 3.
    pub fn error_threshold(mut self, errors: u32) -> Self {
        self.config.errors.threshold = errors.max(1);
        self
    }

    /// How long a key is set aside after too many errors. Default: 30 s.
    pub fn error_cooldown(mut self, cooldown: Duration) -> Self {
        self.config.errors.cooldown = cooldown;
        self
    }

    /// Error counts older than this are forgotten, so scattered errors never add up to a
    /// cooldown. Default: 60 s.
    pub fn error_reset_interval(mut self, interval: Duration) -> Self {
        self.config.errors.reset_interval = interval;
        self
    }

    /// Cooldown after a rate limit that gave no reset time. Default: 60 s, a full
    /// per-minute window.
    pub fn rate_limit_cooldown(mut self, cooldown: Duration) -> Self {
        self.config.rate_limit_cooldown = cooldown;
        self
    }

    /// Cooldown after an exhausted quota that gave no believable reset time. Default: 1 h.
    pub fn quota_cooldown(mut self, cooldown: Duration) -> Self {
        self.config.quota_cooldown = cooldown;
        self
    }

    /// A quota reset time shorter than this is not believed (Gemini sends `retryDelay: 5s`
    /// on daily quotas) and the quota cooldown is used instead. Default: 60 s.
    pub fn quota_min_cooldown(mut self, cooldown: Duration) -> Self {
        self.config.quota_min_cooldown = cooldown;
        self
    }

    /// Lets a request that no key can serve now wait, up to `max` in all, for a key whose
    /// cooldown or budget ends within `max`, instead of failing at once with
    /// [`Exhausted`](crate::Exhausted). Waiters are served first come, first served, per
    /// bucket (a request a key can serve at once goes at once); a refused request waits for
    /// the next key too, within `max_attempts`; a request dropped while it waits leaves the
    /// queue. When every key is disabled,
    /// or the soonest key is further off than `max`, the request fails at once, as without
    /// this option.
    ///
    /// The service also shows it in `poll_ready`: while every key is set aside and one comes
    /// back within `max`, it is not ready (tower's backpressure, so that `LoadShed` sheds and
    /// `Buffer` and `ConcurrencyLimit` hold requests back); it is ready again when a key is.
    /// Buckets and budgets are per request, so `poll_ready` judges the requests that name no
    /// [`Bucket`](crate::Bucket); a request for a spent bucket waits in its future.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_key_fallback::{KeyFallbackLayer, KeySet};
    ///
    /// let layer = KeyFallbackLayer::builder(KeySet::new(["gsk_a", "gsk_b"])?)
    ///     .wait_for_key(Duration::from_secs(30))
    ///     .build();
    /// # Ok::<(), tower_key_fallback::ConfigError>(())
    /// ```
    pub fn wait_for_key(mut self, max: Duration) -> Self {
        self.config.wait_for_key = Some(max);
        self
    }

    /// How long a probe has a half-open key to itself (default 1 s). A key that comes out of
    /// a cooldown, or that the pool has not heard from (at start, after a reset or a
    /// rotation), is half-open: the first request probes it, and the others use other keys,
    /// or wait for the probe's answer when no other key can serve, for at most this long.
    /// A probe that has not answered by then has not been refused (refusals come fast), so
    /// the key is used as usual from then on. `Duration::ZERO` turns probing off: every
    /// request may use a half-open key, as every request in flight then does.
    pub fn probe_wait(mut self, wait: Duration) -> Self {
        self.config.probe_wait = wait;
        self
    }

    /// Builds the layer.
    ///
    /// # Panics
    ///
    /// When [`group`](Self::group) or [`key_limits`](Self::key_limits) names a label the
    /// key set does not have; [`try_build`](Self::try_build) returns that as an error.
    pub fn build(self) -> KeyFallbackLayer {
        match self.try_build() {
            Ok(layer) => layer,
            Err(e) => panic!("{e}"),
        }
    }

    /// Builds the layer, or says which option names a label the key set does not have.
    pub fn try_build(self) -> Result<KeyFallbackLayer, ConfigError> {
        let n = u32::try_from(self.keys.len()).unwrap_or(u32::MAX);
        let labels: Vec<String> = self.keys.labels().map(str::to_owned).collect();
        let index = |label: &str| {
            labels
                .iter()
                .position(|l| l == label)
                .ok_or_else(|| ConfigError::UnknownKey {
                    label: label.to_owned(),
                })
        };
        let mut declared = vec![self.limits; labels.len()];
        for (label, limits) in &self.key_limits {
            declared[index(label)?] = *limits;
        }
        let groups = self
            .groups
            .iter()
            .map(|g| g.iter().map(|l| index(l)).collect())
            .collect::<Result<Vec<Vec<usize>>, _>>()?;
        // A group counts against its first key's budget, with that key's limits.
        for group in &groups {
            if let Some(&first) = group.iter().min() {
                for &k in group {
                    declared[k] = declared[first];
                }
            }
        }
        let lanes = Lanes::new(labels.len(), &groups, declared, self.config.max_cooldown);
        let config = self.config;
        #[cfg(feature = "redis")]
        let outbox = self.store.as_ref().map(|s| s.outbox());
        #[cfg(feature = "redis")]
        let events = match &outbox {
            Some(outbox) => Observer::Custom(Box::new((self.events, outbox.clone()))),
            None => self.events,
        };
        #[cfg(not(feature = "redis"))]
        let events = self.events;
        let pool = Pool::new(
            self.keys.into_keys(),
            |secret| config.credential_value(secret),
            config.round_robin,
            config.errors,
            events,
        )
        .with_lanes(lanes)
        .with_probing(config.probe_wait, config.max_cooldown);
        let shared = Arc::new(Shared {
            pool,
            classifier: self.classifier,
            strip: config.strip(),
            max_attempts: config.max_attempts.unwrap_or(n).min(n),
            config,
            #[cfg(feature = "redis")]
            outbox,
        });
        #[cfg(feature = "redis")]
        if let Some(store) = self.store {
            store.attach(&shared);
        }
        Ok(KeyFallbackLayer { shared })
    }
}
