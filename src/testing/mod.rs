//! A fake Groq / OpenAI-compatible API to test key fallback against (feature `testing`).
//!
//! [`FakeProvider`] answers `POST …/chat/completions` the way Groq does, with a behaviour set
//! per API key in code: serve, run out of a requests-per-window allowance (429 with
//! `retry-after`, `x-ratelimit-*` headers and Groq's JSON body), be out of quota (OpenAI's
//! `insufficient_quota` 429), be invalid (401), be down (503) or be slow. A request whose JSON
//! says `"stream": true` gets a server-sent event stream, one event a frame. It counts every
//! request per key ([`FakeProvider::stats`]), so a test can check what the layer did against
//! what the server saw.
//!
//! It is a tower [`Service`], to use in process, and it can be served over HTTP/1.1 on
//! loopback ([`FakeProvider::serve_ephemeral`]), to put a real client in front of it.
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_key_fallback::testing::{Behavior, FakeProvider};
//! use tower_key_fallback::{KeyFallbackLayer, KeySet};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_key_fallback::BoxError> {
//! let provider = FakeProvider::builder()
//!     .key("gsk_first", Behavior::QuotaExhausted)
//!     .key("gsk_second", Behavior::Ok)
//!     .build();
//! let layer = KeyFallbackLayer::new(KeySet::new(provider.keys())?);
//! let svc = ServiceBuilder::new().layer(layer).service(provider.clone());
//!
//! let req = http::Request::post("http://fake/openai/v1/chat/completions")
//!     .body(Full::new(Bytes::from(r#"{"model":"llama-3.1-8b-instant","messages":[]}"#)))?;
//! let res = svc.oneshot(req).await?;
//! assert_eq!(res.status(), 200);
//! let body = res.into_body().collect().await?.to_bytes();
//! assert!(body.starts_with(br#"{"id":"chatcmpl-"#));
//!
//! // The first key was refused once; the second served.
//! let stats = provider.stats();
//! assert_eq!(stats.key("gsk_first").quota_exhausted, 1);
//! assert_eq!(stats.key("gsk_second").served, 1);
//! # Ok(())
//! # }
//! ```
//!
//! What is faked and what is not:
//!
//! - The requests allowance of [`Behavior::RateLimited`] is a fixed window that starts with
//!   the first request after the previous window ended. Its `x-ratelimit-*-requests` headers
//!   report that window (Groq reports its daily allowance there). Refused requests do not
//!   use up the allowance. With
//!   [`understate_retry_after`](FakeProviderBuilder::understate_retry_after) its answers
//!   announce the window's end earlier than it is.
//! - Token headers are reported, never enforced: `x-ratelimit-limit-tokens` is 18000 and each
//!   request spends about a quarter token per byte of its body plus the answer's tokens.
//! - The request body is read only to find `"model"` and `"stream"`; it is not validated.
//! - Time is [`tokio::time::Instant`]: under a paused tokio clock windows and delays follow
//!   the paused clock.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower_service::Service;

mod body;
mod server;

pub use body::FakeBody;
pub use server::FakeServer;

/// The model named in answers when the request names none (or one that is not plain).
const DEFAULT_MODEL: &str = "llama-3.1-8b-instant";
/// The organization named in rate-limit messages.
const ORGANIZATION: &str = "org_01fakeprovider00000000000000";
/// What `x-ratelimit-limit-tokens` reports (Groq's illustrative tokens-per-minute value).
const TOKENS_PER_MINUTE: u64 = 18_000;
/// What a key that never runs out reports in `x-ratelimit-limit-requests` (Groq's
/// illustrative requests-per-day value).
const REQUESTS_PER_DAY: u64 = 14_400;
const DAY: Duration = Duration::from_secs(86_400);
/// The answer, word by word (one event each when streaming).
const ANSWER: [&str; 6] = ["Hello", " from", " the", " fake", " provider", "."];

/// How the fake provider treats requests made with one API key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Behavior {
    /// Serves every request. Its rate-limit headers count down a daily allowance of 14,400
    /// requests and stay at 1 left from the 14,399th request on (never 0, so no answer reads
    /// as a drained key): a pool that reads them is right to hold the key back from there, so
    /// a test that sends more through one key than that needs more keys.
    Ok,
    /// Serves `requests` requests per `window`, then answers `429 Too Many Requests` with
    /// `retry-after` (whole seconds until the window ends, rounded up), the `x-ratelimit-*`
    /// headers and Groq's `rate_limit_exceeded` body, until the window ends.
    ///
    /// Successes carry `x-ratelimit-remaining-requests` (0 on the last one of a window) and
    /// `x-ratelimit-reset-requests`, the time left in the window as a Go duration
    /// (`1m59.56s`). The body's message names `requests per minute (RPM)`, or `requests per
    /// day (RPD)` for a window of a day or more, as Groq words its daily limit.
    RateLimited {
        /// Requests served per window.
        requests: u32,
        /// The window's length.
        window: Duration,
    },
    /// Answers `429` with OpenAI's `insufficient_quota` body and no `retry-after`: a spent
    /// billing quota.
    QuotaExhausted,
    /// Answers `401` with Groq's `invalid_api_key` body. Keys the provider does not know, and
    /// requests without a key, get the same answer.
    InvalidKey,
    /// Answers `503 Service Unavailable` with OpenAI's `server_is_overloaded` body.
    Outage,
    /// Serves requests while the tokens they spend in the current `window` stay within
    /// `tokens`, then answers `429` with Groq's tokens-per-minute body and `retry-after`
    /// until the window ends. A request spends its prompt (a token per four bytes of the
    /// body, rounded up) plus its `max_completion_tokens` or `max_tokens`, as providers
    /// count before the request runs. Answers report the window in `x-ratelimit-*-tokens`.
    TokenLimited {
        /// Tokens per window.
        tokens: u64,
        /// The window's length.
        window: Duration,
    },
    /// Serves every request like [`Behavior::Ok`], after waiting this long (on top of the
    /// provider's [latency](FakeProviderBuilder::latency)). The wait is a tokio sleep, so a
    /// paused clock skips it.
    Slow(Duration),
}

/// What the fake provider answered for one key, counted since it was built.
///
/// `requests` is every request made with the key; the other fields count the answers by
/// kind and add up to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyStats {
    /// Requests made with the key.
    pub requests: u64,
    /// Answered `200` (streams included).
    pub served: u64,
    /// Of those served, how many as a server-sent event stream.
    pub streamed: u64,
    /// Answered `429` for the requests allowance.
    pub rate_limited: u64,
    /// Answered `429` for an exhausted quota.
    pub quota_exhausted: u64,
    /// Answered `401`.
    pub unauthorized: u64,
    /// Answered `503`.
    pub unavailable: u64,
    /// Answered `404`: not `POST …/chat/completions`.
    pub not_found: u64,
}

impl KeyStats {
    fn add(&mut self, other: &KeyStats) {
        self.requests += other.requests;
        self.served += other.served;
        self.streamed += other.streamed;
        self.rate_limited += other.rate_limited;
        self.quota_exhausted += other.quota_exhausted;
        self.unauthorized += other.unauthorized;
        self.unavailable += other.unavailable;
        self.not_found += other.not_found;
    }
}

/// A snapshot of the fake provider's counts, per key. Made by [`FakeProvider::stats`].
///
/// Keys the provider was not built with are counted too, under the key sent; requests
/// without a key are counted under the empty string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    keys: BTreeMap<String, KeyStats>,
}

impl Stats {
    /// The counts for one key (all zero if it was never used).
    pub fn key(&self, key: &str) -> KeyStats {
        self.keys.get(key).copied().unwrap_or_default()
    }

    /// The counts over every key.
    pub fn total(&self) -> KeyStats {
        let mut total = KeyStats::default();
        for stats in self.keys.values() {
            total.add(stats);
        }
        total
    }

    /// Every key that was used, with its counts, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &KeyStats)> + '_ {
        self.keys.iter().map(|(k, s)| (k.as_str(), s))
    }
}

/// Builds a [`FakeProvider`]. Made by [`FakeProvider::builder`].
#[derive(Debug, Clone, Default)]
pub struct FakeProviderBuilder {
    keys: Vec<(String, Behavior)>,
    latency: Duration,
    stream_interval: Option<Duration>,
    per_model: bool,
    shared: Vec<Vec<String>>,
    hide_limits: bool,
    understate: Duration,
}

impl FakeProviderBuilder {
    /// Adds a key and how requests made with it are answered. Adding a key again replaces
    /// its behaviour.
    pub fn key(mut self, key: impl Into<String>, behavior: Behavior) -> Self {
        let key = key.into();
        match self.keys.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = behavior,
            None => self.keys.push((key, behavior)),
        }
        self
    }

    /// How long every answer waits before its head is sent, whatever the key. Default: no
    /// wait.
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// The pause between two events of a streamed answer. Default: 5 ms, so each event
    /// leaves as its own write.
    pub fn stream_interval(mut self, interval: Duration) -> Self {
        self.stream_interval = Some(interval);
        self
    }

    /// Counts each key's windows per model (the request's `"model"`), as Groq's and
    /// Anthropic's limits are: a key limited on one model still serves the others.
    pub fn per_model(mut self) -> Self {
        self.per_model = true;
        self
    }

    /// Sends no `x-ratelimit-*` headers (a 429 keeps its `retry-after`), as some
    /// OpenAI-compatible servers do: a client then learns of limits only from 429s.
    pub fn without_rate_limit_headers(mut self) -> Self {
        self.hide_limits = true;
        self
    }

    /// Makes every [`Behavior::RateLimited`] key announce the end of its window `by` earlier
    /// than it really is, as a provider whose clock runs ahead or that rounds its reset down
    /// does: the `x-ratelimit-reset-requests` header and the "try again in" of the 429's
    /// body say the time left less `by` (at least zero), and `retry-after` is that rounded
    /// up to whole seconds (at least 1, as always). The window itself is unchanged, so a
    /// client that comes back when told is refused again until the real end. Default: zero.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::ServiceExt;
    /// use tower_key_fallback::testing::{Behavior, FakeProvider};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let provider = FakeProvider::builder()
    ///     .key("gsk_a", Behavior::RateLimited { requests: 1, window: Duration::from_secs(10) })
    ///     .understate_retry_after(Duration::from_secs(3))
    ///     .build();
    /// let call = || {
    ///     let req = http::Request::post("http://fake/openai/v1/chat/completions")
    ///         .header("authorization", "Bearer gsk_a")
    ///         .body(Full::new(Bytes::from_static(b"{}")))
    ///         .unwrap();
    ///     provider.clone().oneshot(req)
    /// };
    /// assert_eq!(call().await?.status(), 200);
    /// // The window has (nearly) 10 s left; the 429 says 7.
    /// let limited = call().await?;
    /// assert_eq!(limited.status(), 429);
    /// assert_eq!(limited.headers()["retry-after"], "7");
    /// # Ok(())
    /// # }
    /// ```
    pub fn understate_retry_after(mut self, by: Duration) -> Self {
        self.understate = by;
        self
    }

    /// Makes `keys` share one limit, as keys made in one organization do: they count
    /// against one window, and each behaves as the first of them (add it with
    /// [`key`](Self::key)). The others need no `key` call.
    pub fn shared_limit<I, K>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: Into<String>,
    {
        self.shared.push(keys.into_iter().map(Into::into).collect());
        self
    }

    /// Builds the provider.
    pub fn build(self) -> FakeProvider {
        let mut keys = HashMap::new();
        let mut order = Vec::new();
        for (key, behavior) in &self.keys {
            order.push(key.clone());
            keys.insert(
                key.clone(),
                KeyEntry {
                    behavior: behavior.clone(),
                    owner: key.clone(),
                },
            );
        }
        for group in &self.shared {
            let Some(first) = group.first() else { continue };
            let behavior = keys.get(first).map_or(Behavior::Ok, |e| e.behavior.clone());
            for key in group {
                if !order.contains(key) {
                    order.push(key.clone());
                }
                keys.insert(
                    key.clone(),
                    KeyEntry {
                        behavior: behavior.clone(),
                        owner: first.clone(),
                    },
                );
            }
        }
        FakeProvider {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    keys,
                    order,
                    stats: BTreeMap::new(),
                    windows: HashMap::new(),
                }),
                per_model: self.per_model,
                hide_limits: self.hide_limits,
                understate: self.understate,
                latency: self.latency,
                stream_interval: self.stream_interval.unwrap_or(Duration::from_millis(5)),
                next_id: AtomicU64::new(1),
            }),
        }
    }
}

/// A fake Groq / OpenAI-compatible chat completions API with per-key behaviour.
///
/// Clones share one state: keys, windows and counts. See the [module docs](self) for an
/// example in process, and [`FakeProvider::serve_ephemeral`] for one over HTTP.
///
/// Any request body type works; the body is read whole before answering.
///
/// ```
/// use std::time::Duration;
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower::ServiceExt;
/// use tower_key_fallback::testing::{Behavior, FakeProvider};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let provider = FakeProvider::builder()
///     .key("gsk_a", Behavior::RateLimited { requests: 1, window: Duration::from_secs(60) })
///     .build();
/// let call = || {
///     let req = http::Request::post("http://fake/openai/v1/chat/completions")
///         .header("authorization", "Bearer gsk_a")
///         .body(Full::new(Bytes::from_static(b"{}")))
///         .unwrap();
///     provider.clone().oneshot(req)
/// };
///
/// let ok = call().await?;
/// assert_eq!(ok.status(), 200);
/// assert_eq!(ok.headers()["x-ratelimit-remaining-requests"], "0");
///
/// let limited = call().await?;
/// assert_eq!(limited.status(), 429);
/// assert_eq!(limited.headers()["retry-after"], "60");
/// assert_eq!(provider.stats().key("gsk_a").rate_limited, 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct FakeProvider {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    per_model: bool,
    hide_limits: bool,
    /// How much earlier than the real end a `RateLimited` key announces its window's end.
    understate: Duration,
    latency: Duration,
    stream_interval: Duration,
    next_id: AtomicU64,
}

struct State {
    keys: HashMap<String, KeyEntry>,
    order: Vec<String>,
    stats: BTreeMap<String, KeyStats>,
    /// Windows by the key that owns the limit, the model (empty unless `per_model`) and
    /// what they count (requests, tokens).
    windows: HashMap<(String, String, Counted), Window>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Counted {
    Requests,
    Tokens,
}

struct KeyEntry {
    behavior: Behavior,
    /// Whose limit it counts against: itself, or the first key of a shared limit.
    owner: String,
}

/// A fixed requests window: starts with the first request after the last one ended.
#[derive(Default)]
struct Window {
    start: Option<Instant>,
    used: u64,
}

impl Window {
    /// Starts a new window if there is none or it ended; returns the time left in it.
    fn refresh(&mut self, now: Instant, length: Duration) -> Duration {
        match self.start {
            Some(start) if now < start + length => start + length - now,
            _ => {
                self.start = Some(now);
                self.used = 0;
                length
            }
        }
    }
}

impl fmt::Debug for FakeProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeProvider")
            .field("keys", &self.state().order.len())
            .field("latency", &self.inner.latency)
            .finish_non_exhaustive()
    }
}

impl FakeProvider {
    /// A builder: add keys with [`FakeProviderBuilder::key`].
    pub fn builder() -> FakeProviderBuilder {
        FakeProviderBuilder::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The keys the provider was built with, in the order they were added: what to give
    /// [`KeySet::new`](crate::KeySet::new).
    pub fn keys(&self) -> Vec<String> {
        self.state().order.clone()
    }

    /// Changes how a key is answered from now on, or adds a key. Its requests window starts
    /// afresh; its counts are kept.
    ///
    /// ```
    /// use tower_key_fallback::testing::{Behavior, FakeProvider};
    ///
    /// let provider = FakeProvider::builder().key("gsk_a", Behavior::Outage).build();
    /// provider.set_behavior("gsk_a", Behavior::Ok); // the outage is over
    /// provider.set_behavior("gsk_new", Behavior::Ok);
    /// assert_eq!(provider.keys(), ["gsk_a", "gsk_new"]);
    /// ```
    pub fn set_behavior(&self, key: &str, behavior: Behavior) {
        let mut state = self.state();
        if !state.keys.contains_key(key) {
            state.order.push(key.to_owned());
        }
        let owner = state
            .keys
            .get(key)
            .map_or(key.to_owned(), |e| e.owner.clone());
        state.windows.retain(|(o, _, _), _| *o != owner);
        state
            .keys
            .insert(key.to_owned(), KeyEntry { behavior, owner });
    }

    /// A snapshot of the counts, per key.
    pub fn stats(&self) -> Stats {
        Stats {
            keys: self.state().stats.clone(),
        }
    }

    /// Answers one request: what the [`Service`] implementation does, as an `async fn`.
    pub async fn respond<B>(&self, req: Request<B>) -> Response<FakeBody>
    where
        B: Body,
    {
        let (parts, body) = req.into_parts();
        let key = bearer(&parts.headers);
        let chat = parts.method == http::Method::POST
            && parts
                .uri
                .path()
                .trim_end_matches('/')
                .ends_with("/chat/completions");
        // The body is read whole (a real server would too) to see "model" and "stream".
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let request = ChatRequest::parse(&body);
        let now = Instant::now();
        let decision = self.decide(key.as_deref(), chat, &request, now);

        let mut delay = self.inner.latency;
        if let Decision::Serve { extra_delay, .. } = &decision {
            delay += *extra_delay;
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.answer(decision, &request, id, &parts.method, parts.uri.path())
    }

    /// Decides the answer and counts it, under the lock.
    fn decide(
        &self,
        key: Option<&str>,
        chat: bool,
        request: &ChatRequest,
        now: Instant,
    ) -> Decision {
        let mut state = self.state();
        let entry = key.and_then(|k| state.keys.get(k));
        let behavior = entry.map(|e| e.behavior.clone());
        let owner = entry.map(|e| e.owner.clone()).unwrap_or_default();
        let model = match self.inner.per_model {
            true => request.model.clone().unwrap_or_default(),
            false => String::new(),
        };
        let mut windows = std::mem::take(&mut state.windows);
        let mut spend = None;
        let mut window = |counted: Counted, length: Duration| {
            let w = windows
                .entry((owner.clone(), model.clone(), counted))
                .or_default();
            let reset = w.refresh(now, length);
            (w.used, reset, (owner.clone(), model.clone(), counted))
        };
        let decision = match behavior {
            None | Some(Behavior::InvalidKey) => Decision::Unauthorized,
            Some(_) if !chat => Decision::NotFound,
            Some(Behavior::QuotaExhausted) => Decision::Quota,
            Some(Behavior::Outage) => Decision::Unavailable,
            Some(b @ (Behavior::Ok | Behavior::Slow(_))) => {
                let (used, reset, k) = window(Counted::Requests, DAY);
                let used = used + 1;
                spend = Some((k, 1));
                Decision::Serve {
                    extra_delay: match b {
                        Behavior::Slow(d) => d,
                        _ => Duration::ZERO,
                    },
                    limits: Limits {
                        limit: REQUESTS_PER_DAY,
                        remaining: REQUESTS_PER_DAY.saturating_sub(used).max(1),
                        reset,
                        tokens: None,
                    },
                }
            }
            Some(Behavior::RateLimited {
                requests,
                window: length,
            }) => {
                let (used, reset, k) = window(Counted::Requests, length);
                // What is announced: the real time left, less the understatement.
                let reset = reset.saturating_sub(self.inner.understate);
                let limit = u64::from(requests);
                if used >= limit {
                    Decision::Limited {
                        limits: Limits {
                            limit,
                            remaining: 0,
                            reset,
                            tokens: None,
                        },
                        used,
                        daily: length >= DAY,
                        tokens: None,
                    }
                } else {
                    spend = Some((k, 1));
                    Decision::Serve {
                        extra_delay: Duration::ZERO,
                        limits: Limits {
                            limit,
                            remaining: limit - used - 1,
                            reset,
                            tokens: None,
                        },
                    }
                }
            }
            Some(Behavior::TokenLimited {
                tokens,
                window: length,
            }) => {
                let cost = request.cost();
                let (used, reset, k) = window(Counted::Tokens, length);
                let limits = |used: u64| Limits {
                    limit: REQUESTS_PER_DAY,
                    remaining: REQUESTS_PER_DAY - 1,
                    reset: DAY,
                    tokens: Some((tokens, tokens.saturating_sub(used), reset)),
                };
                if used + cost > tokens {
                    Decision::Limited {
                        limits: limits(used),
                        used,
                        daily: length >= DAY,
                        tokens: Some(cost),
                    }
                } else {
                    spend = Some((k, cost));
                    Decision::Serve {
                        extra_delay: Duration::ZERO,
                        limits: limits(used + cost),
                    }
                }
            }
        };
        if let Some((k, n)) = spend {
            windows.entry(k).or_default().used += n;
        }
        state.windows = windows;
        let stats = state.stats.entry(key.unwrap_or("").to_owned()).or_default();
        stats.requests += 1;
        match &decision {
            Decision::Serve { .. } => {
                stats.served += 1;
                if request.stream {
                    stats.streamed += 1;
                }
            }
            Decision::Limited { .. } => stats.rate_limited += 1,
            Decision::Quota => stats.quota_exhausted += 1,
            Decision::Unauthorized => stats.unauthorized += 1,
            Decision::Unavailable => stats.unavailable += 1,
            Decision::NotFound => stats.not_found += 1,
        }
        decision
    }

    fn answer(
        &self,
        decision: Decision,
        request: &ChatRequest,
        id: u64,
        method: &http::Method,
        path: &str,
    ) -> Response<FakeBody> {
        let request_id = format!("req_01fake{id:016x}");
        let model = request.model.as_deref().unwrap_or(DEFAULT_MODEL);
        let (status, body, limits) = match decision {
            Decision::Serve { limits, .. } => {
                let tokens = request.prompt_tokens + ANSWER.len() as u64;
                let body = if request.stream {
                    FakeBody::stream(
                        sse_events(id, model, request.prompt_tokens, &request_id),
                        self.inner.stream_interval,
                    )
                } else {
                    FakeBody::full(completion(id, model, request.prompt_tokens, &request_id))
                };
                let mut res = Response::new(body);
                let headers = res.headers_mut();
                if request.stream {
                    headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/event-stream"),
                    );
                    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                } else {
                    headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                }
                if !self.inner.hide_limits {
                    rate_limit_headers(headers, &limits, tokens);
                }
                insert(headers, "x-request-id", &request_id);
                return res;
            }
            Decision::Limited {
                limits,
                used,
                daily,
                tokens,
            } => {
                let (kind, window, limit, requested, reset) = match (tokens, limits.tokens) {
                    (Some(requested), Some((limit, _, reset))) => {
                        let w = if daily { "tokens per day (TPD)" } else { "tokens per minute (TPM)" };
                        ("tokens", w, limit, requested, reset)
                    }
                    _ => {
                        let w = if daily { "requests per day (RPD)" } else { "requests per minute (RPM)" };
                        ("requests", w, limits.limit, 1, limits.reset)
                    }
                };
                let message = format!(
                    "Rate limit reached for model `{model}` in organization `{ORGANIZATION}` service tier `on_demand` on {window}: Limit {limit}, Used {used}, Requested {requested}. Please try again in {}. Visit https://console.groq.com/docs/rate-limits for more information.",
                    go_duration(reset),
                );
                let body = format!(
                    r#"{{"error":{{"message":"{message}","type":"{kind}","code":"rate_limit_exceeded"}}}}"#
                );
                (StatusCode::TOO_MANY_REQUESTS, body, Some(limits))
            }
            Decision::Quota => (
                StatusCode::TOO_MANY_REQUESTS,
                r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#.to_owned(),
                None,
            ),
            Decision::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                r#"{"error":{"message":"Invalid API Key","type":"invalid_request_error","code":"invalid_api_key"}}"#.to_owned(),
                None,
            ),
            Decision::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"error":{"message":"The server is overloaded or not ready yet.","type":"service_unavailable_error","param":null,"code":"server_is_overloaded"}}"#.to_owned(),
                None,
            ),
            Decision::NotFound => (
                StatusCode::NOT_FOUND,
                format!(
                    r#"{{"error":{{"message":"Unknown request URL: {method} {}. Please check the URL for typos, or see the docs at https://console.groq.com/docs/","type":"invalid_request_error","code":"unknown_url"}}}}"#,
                    plain(path, "/"),
                ),
                None,
            ),
        };
        let mut res = Response::new(FakeBody::full(body));
        *res.status_mut() = status;
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(limits) = limits {
            let reset = limits.tokens.map_or(limits.reset, |t| t.2);
            let wait = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(wait.max(1)));
            if !self.inner.hide_limits {
                rate_limit_headers(headers, &limits, 0);
            }
        }
        insert(headers, "x-request-id", &request_id);
        res
    }

    /// Serves the provider over HTTP/1.1 at `addr` until the returned server is shut down or
    /// dropped. Give a loopback address (`127.0.0.1:0` picks a free port); the server's
    /// [`addr`](FakeServer::addr) is the one bound.
    pub async fn serve(&self, addr: std::net::SocketAddr) -> std::io::Result<FakeServer> {
        FakeServer::start(self.clone(), addr).await
    }

    /// Serves the provider over HTTP/1.1 on `127.0.0.1`, on a port the system picks.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::{BodyExt, Full};
    /// use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    /// use tower::{ServiceBuilder, ServiceExt};
    /// use tower_key_fallback::testing::{Behavior, FakeProvider};
    /// use tower_key_fallback::{KeyFallbackLayer, KeySet, KeyState};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_key_fallback::BoxError> {
    /// let provider = FakeProvider::builder()
    ///     .key("gsk_revoked", Behavior::InvalidKey)
    ///     .key("gsk_good", Behavior::Ok)
    ///     .build();
    /// let server = provider.serve_ephemeral().await?;
    ///
    /// let layer = KeyFallbackLayer::new(KeySet::new(provider.keys())?);
    /// let handle = layer.handle();
    /// let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    /// let svc = ServiceBuilder::new().layer(layer).service(client);
    ///
    /// let req = http::Request::post(server.url("/openai/v1/chat/completions"))
    ///     .header("content-type", "application/json")
    ///     .body(Full::new(Bytes::from(r#"{"model":"llama-3.1-8b-instant","messages":[]}"#)))?;
    /// let res = svc.oneshot(req).await?;
    /// assert_eq!(res.status(), 200);
    /// res.into_body().collect().await?;
    ///
    /// assert!(matches!(handle.status().keys[0].state, KeyState::Disabled { .. }));
    /// assert_eq!(provider.stats().total().requests, 2);
    /// server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn serve_ephemeral(&self) -> std::io::Result<FakeServer> {
        self.serve(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
    }
}

impl<B> Service<Request<B>> for FakeProvider
where
    B: Body + Send + 'static,
    B::Data: Send,
{
    type Response = Response<FakeBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<FakeBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let provider = self.clone();
        Box::pin(async move { Ok(provider.respond(req).await) })
    }
}

/// The requests allowance as the headers report it.
struct Limits {
    limit: u64,
    remaining: u64,
    reset: Duration,
    /// A token window's limit, remaining and reset, when the key has one.
    tokens: Option<(u64, u64, Duration)>,
}

enum Decision {
    Serve {
        extra_delay: Duration,
        limits: Limits,
    },
    Limited {
        limits: Limits,
        used: u64,
        daily: bool,
        /// The tokens requested, when the token window refused it.
        tokens: Option<u64>,
    },
    Quota,
    Unauthorized,
    Unavailable,
    NotFound,
}

/// What the fake reads of a request body.
#[derive(Debug, Default)]
struct ChatRequest {
    model: Option<String>,
    stream: bool,
    prompt_tokens: u64,
    max_tokens: u64,
}

impl ChatRequest {
    fn parse(body: &[u8]) -> ChatRequest {
        let text = std::str::from_utf8(body).unwrap_or("");
        ChatRequest {
            model: json_value(text, "model")
                .and_then(|v| v.strip_prefix('"'))
                .and_then(|v| v.split('"').next())
                .filter(|m| !m.is_empty() && plain(m, "") == *m)
                .map(str::to_owned),
            stream: json_value(text, "stream").is_some_and(|v| v.starts_with("true")),
            prompt_tokens: (body.len() as u64).div_ceil(4).max(1),
            max_tokens: ["max_completion_tokens", "max_tokens"]
                .iter()
                .find_map(|name| {
                    let v = json_value(text, name)?;
                    let digits = v.split(|c: char| !c.is_ascii_digit()).next()?;
                    digits.parse().ok()
                })
                .unwrap_or(0),
        }
    }

    /// What the request spends of a token window before it runs.
    fn cost(&self) -> u64 {
        self.prompt_tokens + self.max_tokens
    }
}

/// The text right after `"name":` at the top of a JSON text, if the name is there (a light
/// look, good enough for the fake: it does not parse nesting).
fn json_value<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let quoted = format!("\"{name}\"");
    let mut rest = text;
    while let Some(at) = rest.find(&quoted) {
        let after = rest[at + quoted.len()..].trim_start();
        if let Some(value) = after.strip_prefix(':') {
            return Some(value.trim_start());
        }
        rest = &rest[at + quoted.len()..];
    }
    None
}

/// `s` if it holds only characters safe to echo in JSON and headers, else `fallback`.
fn plain<'a>(s: &'a str, fallback: &'a str) -> &'a str {
    let ok = s.len() <= 200
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._/:@+".contains(&b));
    if ok {
        s
    } else {
        fallback
    }
}

/// The key from `Authorization: Bearer <key>`.
fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, key) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let key = key.trim();
    (!key.is_empty()).then(|| key.to_owned())
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// Groq's `x-ratelimit-*` headers: requests for the key's window, tokens per minute.
fn rate_limit_headers(headers: &mut HeaderMap, limits: &Limits, tokens: u64) {
    let tokens = tokens.min(TOKENS_PER_MINUTE);
    // Tokens come back at TOKENS_PER_MINUTE a minute: this request's are back after this.
    let tokens_reset = Duration::from_millis(tokens * 60_000 / TOKENS_PER_MINUTE);
    let (tokens_limit, tokens_left, tokens_reset) =
        limits
            .tokens
            .unwrap_or((TOKENS_PER_MINUTE, TOKENS_PER_MINUTE - tokens, tokens_reset));
    insert(
        headers,
        "x-ratelimit-limit-requests",
        &limits.limit.to_string(),
    );
    insert(
        headers,
        "x-ratelimit-limit-tokens",
        &tokens_limit.to_string(),
    );
    insert(
        headers,
        "x-ratelimit-remaining-requests",
        &limits.remaining.to_string(),
    );
    insert(
        headers,
        "x-ratelimit-remaining-tokens",
        &tokens_left.to_string(),
    );
    insert(
        headers,
        "x-ratelimit-reset-requests",
        &go_duration(limits.reset),
    );
    insert(
        headers,
        "x-ratelimit-reset-tokens",
        &go_duration(tokens_reset),
    );
}

/// A duration as Go prints it, the way Groq and OpenAI send reset times: `2m59.56s`,
/// `7.66s`, `644ms`, `1h0m0s`, `0s`. Fractions keep at most three digits.
pub(crate) fn go_duration(d: Duration) -> String {
    fn trimmed(value: f64) -> String {
        let s = format!("{value:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_owned()
    }
    if d.is_zero() {
        return "0s".to_owned();
    }
    if d < Duration::from_secs(1) {
        return format!("{}ms", trimmed(d.as_secs_f64() * 1000.0));
    }
    let total = d.as_secs();
    let (hours, minutes) = (total / 3600, (total % 3600) / 60);
    let seconds = (total % 60) as f64 + f64::from(d.subsec_nanos()) / 1e9;
    let seconds = trimmed(seconds);
    match (hours, minutes) {
        (0, 0) => format!("{seconds}s"),
        (0, m) => format!("{m}m{seconds}s"),
        (h, m) => format!("{h}h{m}m{seconds}s"),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A chat completion as Groq sends it.
fn completion(id: u64, model: &str, prompt_tokens: u64, request_id: &str) -> String {
    let content: String = ANSWER.concat();
    let completion_tokens = ANSWER.len();
    let total = prompt_tokens + completion_tokens as u64;
    format!(
        concat!(
            r#"{{"id":"chatcmpl-fake{id:012x}","object":"chat.completion","created":{created},"model":"{model}","#,
            r#""choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}"}},"logprobs":null,"finish_reason":"stop"}}],"#,
            r#""usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{total}}},"#,
            r#""system_fingerprint":"fp_fake","x_groq":{{"id":"{request_id}"}}}}"#,
        ),
        id = id,
        created = unix_now(),
        model = model,
        content = content,
        prompt = prompt_tokens,
        completion = completion_tokens,
        total = total,
        request_id = request_id,
    )
}

/// A streamed chat completion as Groq sends it: a role event, one event per word, a final
/// event with the usage, and `data: [DONE]`.
fn sse_events(id: u64, model: &str, prompt_tokens: u64, request_id: &str) -> Vec<Bytes> {
    let created = unix_now();
    let event = |delta: &str, finish: &str, extra: &str| {
        Bytes::from(format!(
            concat!(
                r#"data: {{"id":"chatcmpl-fake{id:012x}","object":"chat.completion.chunk","created":{created},"model":"{model}","system_fingerprint":"fp_fake","#,
                r#""choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}],"x_groq":{{"id":"{request_id}"{extra}}}}}"#,
                "\n\n"
            ),
            id = id,
            created = created,
            model = model,
            delta = delta,
            finish = finish,
            request_id = request_id,
            extra = extra,
        ))
    };
    let mut events = vec![event(r#"{"role":"assistant","content":""}"#, "null", "")];
    for word in ANSWER {
        events.push(event(&format!(r#"{{"content":"{word}"}}"#), "null", ""));
    }
    let completion_tokens = ANSWER.len() as u64;
    events.push(event(
        "{}",
        r#""stop""#,
        &format!(
            r#","usage":{{"prompt_tokens":{prompt_tokens},"completion_tokens":{completion_tokens},"total_tokens":{}}}"#,
            prompt_tokens + completion_tokens
        ),
    ));
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_as_groq_sends_them() {
        let ms = Duration::from_millis;
        assert_eq!(go_duration(ms(179_560)), "2m59.56s");
        assert_eq!(go_duration(ms(7_660)), "7.66s");
        assert_eq!(go_duration(ms(644)), "644ms");
        assert_eq!(go_duration(ms(12_500)), "12.5s");
        assert_eq!(go_duration(ms(3_600_000)), "1h0m0s");
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(Duration::from_micros(1_500)), "1.5ms");
        assert_eq!(go_duration(ms(60_000)), "1m0s");
    }

    #[test]
    fn reads_model_and_stream() {
        let r = ChatRequest::parse(br#"{"model": "llama-3.3-70b-versatile", "stream" : true}"#);
        assert_eq!(r.model.as_deref(), Some("llama-3.3-70b-versatile"));
        assert!(r.stream);
        let r = ChatRequest::parse(br#"{"messages":[],"stream":false,"model":"a\"b"}"#);
        assert!(!r.stream);
        assert_eq!(r.model, None);
        let r = ChatRequest::parse(b"not json");
        assert!(!r.stream && r.model.is_none());
    }

    #[test]
    fn bearer_keys() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer gsk_a"),
        );
        assert_eq!(bearer(&h).as_deref(), Some("gsk_a"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  gsk_b "),
        );
        assert_eq!(bearer(&h).as_deref(), Some("gsk_b"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }
}
