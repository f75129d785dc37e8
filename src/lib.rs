//! Run HTTP API calls over a pool of API keys, and keep working when a key runs dry.
//!
//! [`KeyFallbackLayer`] is a [tower] middleware for any HTTP client service
//! (`Service<http::Request<B>>`: hyper-util's `Client`, a tower stack in an axum proxy, …).
//! For every request it:
//!
//! - sets the credential of the first usable key (`Authorization: Bearer` by default),
//!   replacing whatever the caller set;
//! - reads the response's status and headers, and for error statuses a bounded prefix of the
//!   body, and tells apart success, a per-minute rate limit, an exhausted quota, an invalid
//!   key, an overload or outage, a transport error and the request's own fault
//!   ([`DefaultClassifier`]);
//! - on a failure that is the key's, replays the same request with the next usable key;
//! - keeps per-key state: a cooldown until the provider's own reset time, error counts with a
//!   temporary set-aside after too many, a lasting disable for dead keys, recovery by itself;
//! - keeps, per key and [`Bucket`] (model), what the provider reported the key has left, less
//!   the requests sent since, and passes over a key whose budget is spent;
//! - probes a key that comes back from a cooldown (or that it has not heard from) with one
//!   request before the others follow, can let requests wait in turn for a key
//!   ([`KeyFallbackBuilder::wait_for_key`], with backpressure in `poll_ready`), and keeps a
//!   request with an [`Affinity`] on one key.
//!
//! Success bodies, server-sent event streams included, pass through untouched.
//!
//! ```no_run
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_key_fallback::{KeyFallbackLayer, KeySet};
//!
//! # async fn run() -> Result<(), tower_key_fallback::BoxError> {
//! // GROQ_API_KEY, GROQ_API_KEY_2, GROQ_API_KEY_3, …
//! let layer = KeyFallbackLayer::new(KeySet::from_env("GROQ_API_KEY")?);
//! let handle = layer.handle();
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let mut svc = ServiceBuilder::new().layer(layer).service(client);
//!
//! let req = http::Request::post("http://127.0.0.1:8080/openai/v1/chat/completions")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from(r#"{"model":"llama-3.1-8b-instant","messages":[]}"#)))?;
//! let res = svc.ready().await?.call(req).await?;
//! println!("{} via {:?}", res.status(), handle.status());
//! # Ok(())
//! # }
//! ```
//!
//! Keys, their order and their cooldowns are described in the [README]; [`KeyHandle`] shows
//! and changes their state at run time.
//!
//! With the feature `metrics`, [`MetricsEvents`] records what the layer does on the `metrics`
//! facade (attempts by key and verdict, cooldowns, switches, exhaustion, each key's state), for
//! Prometheus or any other recorder.
//!
//! With the feature `serde`, [`PoolStatus`] and the other status types implement
//! `serde::Serialize` as flat, stable JSON (labels and fingerprints, never a key), for a
//! status endpoint such as the gateway's `GET /keys` (`key-fallback-gateway`, feature `gateway`).
//!
//! # How the crate is built
//!
//! Each module owns one thing and imports only the modules above it in this list (checked by
//! `tests/module_graph.rs`):
//!
//! | module | owns | imports |
//! |---|---|---|
//! | `error` | [`BoxError`], [`ConfigError`] | nothing |
//! | `status` | the status types: [`KeyState`], [`KeyStatus`], [`PoolStatus`], the reasons, [`KeyRecord`] | nothing |
//! | `affinity` | [`Affinity`] and the rendezvous ranking of keys | nothing |
//! | `parse`, `errorbody` | parsers for reset times, and the scanner of providers' JSON error envelopes | nothing |
//! | `classify` | [`Classify`], [`DefaultClassifier`], [`Verdict`], [`ErrorVerdict`]: what an answer means | `parse`, `errorbody` |
//! | `keys` | [`KeySet`], fingerprints, credential header values, [`KeyInUse`] | `error` |
//! | `config` | [`Credential`] and the one cooldown policy: what a verdict does to a key | `classify`, `status`, `keys` |
//! | `provider` | [`Provider`]: the presets (credential, key variables, base URL, classifier settings) | `classify`, `config`, `keys`, `error` |
//! | `events` | [`KeyEvents`], [`KeyEvent`], [`TracingEvents`] | `classify`, `status` |
//! | `capacity` | [`Bucket`], [`TokenCost`], [`Limits`], and what an answer's headers report of a key's allowance | `parse`, `errorbody` |
//! | `budget` | per key (or group) and bucket: the provider's remaining counts less what was sent since, bucket cooldowns and probes, the wait queues, shared limits noticed | `capacity` |
//! | `pool` | per-key state in atomics (half-open keys and their probe included), key choice, export and import | `affinity`, `budget`, `capacity`, `config`, `events`, `keys`, `status` |
//! | `body` | [`TryCloneBody`], [`SendOnce`], [`KeyFallbackBody`], [`InspectedBody`], the bounded peek | `error` |
//! | `answer` | [`Exhausted`] and the proxy's 429 and 502 | `body`, `error` |
//! | `driver` | one request's walk over the keys, as decisions without I/O (when to wait included) | all of the above |
//! | `wait` | waiting in turn for a key: the queue, the wake-ups | `driver`, `events` |
//! | `handle` | [`KeyHandle`] | `driver`, `pool`, `keys`, `status` |
//! | `inspect` | reading an error body for classification, with a time bound | `driver`, `body` |
//! | `future`, `service` | the tower adapter: [`KeyFallback`], [`ResponseFuture`], readiness | `driver`, `wait`, `inspect`, `answer`, `body`, `handle` |
//! | `layer` | [`KeyFallbackLayer`], [`KeyFallbackBuilder`] | the above |
//! | `share` | key state between processes without I/O: the messages, the queue the pool's events feed, the merge (feature `redis`) | `pool`, `events`, `status` |
//! | `store` | [`RedisStore`]: the task that subscribes, loads, publishes and reconnects (feature `redis`) | `share`, `driver` |
//! | `reqwest_walk` | one request's attempts for the adapters of `reqwest::Request`s: copies, inspection, waits (features `reqwest-middleware`, `async-openai`) | `driver`, `wait`, `inspect`, `classify`, `config`, `answer`, `body` |
//! | `metrics` | [`MetricsEvents`]: the events as counters, gauges and histograms of the `metrics` facade (feature `metrics`) | `events`, `classify`, `status` |
//! | `reqwest_middleware`, `async_openai`, `metrics`, `retry`, `dotenv`, `serialize`, `testing` | the optional parts, one feature each | the above |
//!
//! Where to add things:
//! - **a provider preset**: `provider` (and its signals in `classify`, `errorbody` for a
//!   field of its error JSON);
//! - **a metric, a log, a store's writer**: a [`KeyEvents`] observer, given to
//!   [`KeyFallbackBuilder::events`];
//! - **a store's reader** (state learned by other processes): [`KeyHandle::import`], with
//!   [`KeyHandle::export`] on the other side; the Redis store (`store`, `share`) is the one
//!   built in, and another store would reuse `share`'s messages and merge;
//! - **a cooldown rule**: `config` (`Config::outcome`);
//! - **a provider's rate-limit headers**: `capacity` (`Report::from_headers`);
//! - **another client library**: a new adapter beside `future` and `reqwest_middleware`,
//!   doing the I/O and asking the `driver` what to do (one whose requests are
//!   `reqwest::Request`s needs only an `Attempt` for `reqwest_walk`, as `async_openai` does).
//!
//! [tower]: https://docs.rs/tower
//! [README]: https://github.com/tower-key-fallback/tower-key-fallback#readme
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

mod affinity;
mod answer;
mod body;
mod budget;
mod capacity;
mod classify;
mod config;
mod driver;
mod error;
mod errorbody;
mod events;
mod future;
mod handle;
mod inspect;
mod keys;
mod layer;
mod parse;
mod pool;
mod provider;
mod service;
mod status;
// The pool's atomics, mutex and credential cell: std's, or loom's in the model check.
mod sync;
mod wait;
// Feature `serde`: `Serialize` for `PoolStatus`, `KeyStatus`, `KeyState` and the reasons.
#[cfg(feature = "serde")]
mod serialize;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

#[cfg(feature = "async-openai")]
mod async_openai;
#[cfg(feature = "dotenv")]
mod dotenv;
#[cfg(feature = "metrics")]
mod metrics;
#[cfg(feature = "reqwest-middleware")]
mod reqwest_middleware;
// The loop of the adapters whose requests are `reqwest::Request`s.
#[cfg(any(feature = "reqwest-middleware", feature = "async-openai"))]
mod reqwest_walk;
#[cfg(feature = "retry")]
mod retry;
#[cfg(any(feature = "redis", fuzzing))]
mod share;
#[cfg(feature = "redis")]
mod store;

pub use affinity::Affinity;
pub use answer::Exhausted;
pub use body::{InspectedBody, KeyFallbackBody, SendOnce, TryCloneBody};

/// The responses of [`KeyFallback`] over a client whose responses have bodies `B`
/// (`hyper::body::Incoming` for hyper-util's client).
pub type KeyFallbackResponse<B> = http::Response<KeyFallbackBody<B>>;
pub use capacity::{annotate_openai_json, Bucket, Limits, TokenCost};

/// The old name of [`InspectedBody`].
#[deprecated(note = "renamed `InspectedBody`: it is the body of every inspected response")]
pub type ExhaustedBody = InspectedBody;
pub use classify::{
    classify_transport_error, Classify, DefaultClassifier, ErrorVerdict, HeadVerdict, Verdict,
};
pub use config::Credential;
pub use error::{BoxError, ConfigError};
pub use events::{KeyEvent, KeyEvents, TracingEvents};
pub use future::ResponseFuture;
pub use handle::KeyHandle;
pub use keys::{KeyInUse, KeySet};
pub use layer::{KeyFallbackBuilder, KeyFallbackLayer};
pub use provider::Provider;
pub use service::KeyFallback;
pub use status::{
    BucketStatus, CooldownReason, DisableReason, KeyRecord, KeyState, KeyStatus, PoolStatus,
    Probing, RecordedState, SharedLimit,
};

#[cfg(feature = "async-openai")]
#[cfg_attr(docsrs, doc(cfg(feature = "async-openai")))]
pub use crate::async_openai::{KeyFallbackOpenAI, KeyFallbackOpenAILayer};
#[cfg(feature = "dotenv")]
#[cfg_attr(docsrs, doc(cfg(feature = "dotenv")))]
pub use crate::dotenv::DotenvError;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub use crate::metrics::MetricsEvents;
#[cfg(feature = "reqwest-middleware")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest-middleware")))]
pub use crate::reqwest_middleware::KeyFallbackMiddleware;
#[cfg(feature = "retry")]
#[cfg_attr(docsrs, doc(cfg(feature = "retry")))]
pub use crate::retry::RetryExhausted;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use store::{RedisStore, RedisStoreBuilder, StoreError};

// The README's examples are compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// What the fuzz targets in `fuzz/` reach (cargo-fuzz builds with `--cfg fuzzing`): the
/// crate-private parsers, whose invariants `fuzz/src/lib.rs` asserts. Not part of the API.
#[cfg(fuzzing)]
#[doc(hidden)]
#[allow(missing_docs)]
pub mod __fuzz {
    use std::time::{Duration, SystemTime};

    use crate::parse;

    pub const MAX_WAIT: Duration = parse::MAX_WAIT;
    pub fn seconds(s: &[u8]) -> Option<Duration> {
        parse::seconds(s)
    }
    pub fn millis(s: &[u8]) -> Option<Duration> {
        parse::millis(s)
    }
    pub fn retry_after(v: &[u8], now: impl FnOnce() -> SystemTime) -> Option<Duration> {
        parse::retry_after(v, now)
    }
    pub fn rfc3339_until(v: &[u8], now: SystemTime) -> Option<Duration> {
        parse::rfc3339_until(v, now)
    }
    pub fn go_duration(s: &str) -> Option<Duration> {
        parse::go_duration(s)
    }
    pub fn body_hint(body: &[u8]) -> Option<Duration> {
        parse::body_hint(body)
    }
    pub fn find_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
        parse::find_ci(hay, needle)
    }
    pub fn header_hint(headers: &http::HeaderMap) -> Option<Duration> {
        crate::classify::header_hint(headers, &crate::classify::Now::new())
    }
    /// A message of the shared key state, read from `data`: if it reads, it writes back as
    /// itself (asserted inside).
    pub fn share_message(data: &[u8]) {
        crate::share::fuzz_message(data)
    }

    /// A `.env` file's variables: name → (value, line).
    #[cfg(feature = "dotenv")]
    pub type Vars = std::collections::HashMap<String, (String, usize)>;
    #[cfg(feature = "dotenv")]
    pub fn parse_dotenv(path: &std::path::Path, data: &[u8]) -> Result<Vars, crate::DotenvError> {
        crate::dotenv::parse(path, data).map(|file| file.vars().clone())
    }
    /// The key set for `prefix` from the file `data` alone (an empty environment).
    #[cfg(feature = "dotenv")]
    pub fn merge_dotenv(
        prefix: &str,
        path: &std::path::Path,
        data: &[u8],
    ) -> Result<crate::KeySet, crate::DotenvError> {
        let file = crate::dotenv::parse(path, data)?;
        crate::dotenv::merge(prefix, Vec::new(), Some(&file))
    }
}
