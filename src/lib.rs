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
//!   temporary set-aside after too many, a lasting disable for dead keys, recovery by itself.
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
//! With the feature `serde`, [`PoolStatus`] and the other status types implement
//! `serde::Serialize` as flat, stable JSON (labels and fingerprints, never a key), for a
//! status endpoint such as the gateway example's `GET /keys`.
//!
//! [tower]: https://docs.rs/tower
//! [README]: https://github.com/tower-key-fallback/tower-key-fallback#readme
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

mod attempts;
mod body;
mod classify;
mod error;
mod errorbody;
mod future;
mod handle;
mod keys;
mod layer;
mod parse;
mod pool;
mod service;
// The pool's atomics, mutex and credential cell: std's, or loom's in the model check.
mod sync;
// Feature `serde`: `Serialize` for `PoolStatus`, `KeyStatus`, `KeyState` and the reasons.
#[cfg(feature = "serde")]
mod serialize;
#[cfg(feature = "testing")]
pub mod testing;

#[cfg(feature = "dotenv")]
mod dotenv;
#[cfg(feature = "reqwest-middleware")]
mod reqwest_middleware;
#[cfg(feature = "retry")]
mod retry;

pub use body::{ExhaustedBody, KeyFallbackBody, SendOnce, TryCloneBody};
pub use classify::{
    classify_transport_error, Classify, DefaultClassifier, ErrorVerdict, HeadVerdict, Verdict,
};
pub use error::{BoxError, ConfigError, Exhausted};
pub use future::ResponseFuture;
pub use handle::{CooldownReason, DisableReason, KeyHandle, KeyState, KeyStatus, PoolStatus};
pub use keys::{KeyInUse, KeySet};
pub use layer::{Credential, KeyFallbackBuilder, KeyFallbackLayer};
pub use service::KeyFallback;

#[cfg(feature = "dotenv")]
pub use crate::dotenv::DotenvError;
#[cfg(feature = "reqwest-middleware")]
pub use crate::reqwest_middleware::KeyFallbackMiddleware;
#[cfg(feature = "retry")]
pub use crate::retry::RetryExhausted;

// The README's examples are compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
