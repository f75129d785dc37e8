//! Capacity: what a request will spend and where (its [`Bucket`] and [`TokenCost`]), what the
//! caller knows of a key's limits ([`Limits`]), and what a provider's answer reported of them.
//!
//! A request names its bucket and cost in its extensions; the pool keeps, per key and bucket,
//! the provider's last `remaining` count less the requests sent since, and passes over a key
//! whose budget would go below zero (see the crate's "Budgets" docs in the README).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderMap;

use crate::errorbody::{walk, Seg};
use crate::parse;

/// The rate-limit bucket a request counts against: for LLM APIs, its model. A request
/// extension; without one, a request counts against the key as a whole.
///
/// Rate limits, budgets and drained-success cooldowns apply to a key within one bucket, so a
/// key limited on one model keeps serving others; an invalid key or a spent quota applies
/// to the key in every bucket. The pool keeps at most 64 named buckets; requests for more
/// count against the key as a whole.
///
/// ```
/// use tower_key_fallback::Bucket;
///
/// let body = br#"{"model":"llama-3.1-8b-instant","messages":[]}"#;
/// assert_eq!(Bucket::from_openai_json(body).unwrap().name(), "llama-3.1-8b-instant");
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(Bucket::new("gemma2-9b-it"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Bucket(Arc<str>);

impl Bucket {
    /// A bucket by name.
    pub fn new(name: impl Into<Arc<str>>) -> Bucket {
        Bucket(name.into())
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The top-level `"model"` of an OpenAI-style JSON request body, when it is a plain
    /// string (no escapes) of at most 200 bytes.
    pub fn from_openai_json(body: &[u8]) -> Option<Bucket> {
        read_openai_json(body).0
    }
}

/// What a request is expected to spend of a key's token budget: a request extension. A key
/// whose provider reported fewer tokens left (less what requests in flight are expected to
/// spend) is passed over for it.
///
/// ```
/// use tower_key_fallback::TokenCost;
///
/// let body = br#"{"model":"m","max_tokens":256,"messages":[{"role":"user","content":"hi"}]}"#;
/// let cost = TokenCost::estimate_openai_json(body);
/// assert_eq!(cost, TokenCost(256 + (body.len() as u64).div_ceil(4)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenCost(pub u64);

impl TokenCost {
    /// An OpenAI-style JSON body's cost, as providers count it before the request runs: its
    /// top-level `max_completion_tokens` (else `max_tokens`, else 0) plus a prompt estimate
    /// of a token per four bytes of the body, rounded up.
    pub fn estimate_openai_json(body: &[u8]) -> TokenCost {
        read_openai_json(body).1
    }
}

/// Sets a request's [`Bucket`] (its `"model"`) and [`TokenCost`] from its OpenAI-style JSON
/// body, for a caller that has the body's bytes (the gateway binary does this).
pub fn annotate_openai_json<B>(req: &mut http::Request<B>, body: &[u8]) {
    let (bucket, cost) = read_openai_json(body);
    if let Some(bucket) = bucket {
        req.extensions_mut().insert(bucket);
    }
    req.extensions_mut().insert(cost);
}

/// An OpenAI-style JSON body's bucket and token cost, in one walk over it.
fn read_openai_json(body: &[u8]) -> (Option<Bucket>, TokenCost) {
    let (mut model, mut max_tokens, mut max_completion) = (None, None, None);
    walk(body, |path, value| {
        let number = || std::str::from_utf8(value).ok()?.parse::<u64>().ok();
        match path {
            [Seg::Key(b"model")] if model.is_none() && plain(value) => {
                model = std::str::from_utf8(value).ok().map(Bucket::new);
            }
            [Seg::Key(b"max_tokens")] => max_tokens = max_tokens.or_else(number),
            [Seg::Key(b"max_completion_tokens")] => max_completion = max_completion.or_else(number),
            _ => {}
        }
    });
    let answer = max_completion.or(max_tokens).unwrap_or(0);
    let cost = TokenCost(answer.saturating_add((body.len() as u64).div_ceil(4)));
    (model, cost)
}

fn plain(value: &[u8]) -> bool {
    value.len() <= 200 && !value.contains(&b'\\')
}

/// Limits known in advance for a key, or a group of keys that share them, so the pool paces
/// from the first request instead of learning from 429s. What a provider reports overrides
/// them while its report is current. One window for requests and one for tokens.
///
/// ```
/// use tower_key_fallback::{KeyFallbackLayer, KeySet, Limits};
///
/// let keys = KeySet::new(["gsk_a", "gsk_b"])?;
/// let layer = KeyFallbackLayer::builder(keys)
///     .limits(Limits::new().requests_per_minute(30).tokens_per_minute(6_000))
///     .build();
/// # Ok::<(), tower_key_fallback::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub(crate) requests: Option<(u64, Duration)>,
    pub(crate) tokens: Option<(u64, Duration)>,
}

impl Limits {
    /// No limits.
    pub fn new() -> Limits {
        Limits::default()
    }
    /// `n` requests per `window`.
    pub fn requests(mut self, n: u64, window: Duration) -> Limits {
        self.requests = (n > 0 && !window.is_zero()).then_some((n, window));
        self
    }
    /// `n` requests per minute.
    pub fn requests_per_minute(self, n: u64) -> Limits {
        self.requests(n, Duration::from_secs(60))
    }
    /// `n` requests per day.
    pub fn requests_per_day(self, n: u64) -> Limits {
        self.requests(n, Duration::from_secs(86_400))
    }
    /// `n` tokens per `window`.
    pub fn tokens(mut self, n: u64, window: Duration) -> Limits {
        self.tokens = (n > 0 && !window.is_zero()).then_some((n, window));
        self
    }
    /// `n` tokens per minute.
    pub fn tokens_per_minute(self, n: u64) -> Limits {
        self.tokens(n, Duration::from_secs(60))
    }
    /// `n` tokens per day.
    pub fn tokens_per_day(self, n: u64) -> Limits {
        self.tokens(n, Duration::from_secs(86_400))
    }
}

/// One dimension of what an answer reported: the window's limit, what is left of it, and
/// when it is whole again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) limit: Option<u64>,
    pub(crate) remaining: Option<u64>,
    pub(crate) reset: Option<Duration>,
}

/// What an answer's headers reported of the key's allowance: `x-ratelimit-*` (Groq, OpenAI,
/// Azure and most OpenAI-compatible APIs; Go-duration or seconds resets) and Anthropic's
/// `anthropic-ratelimit-*` (RFC 3339 resets). Negative values (Azure's `-1`) are no report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Report {
    pub(crate) requests: Window,
    pub(crate) tokens: Window,
    /// It came with a 429: the request was refused.
    pub(crate) refused: bool,
}

impl Report {
    /// One pass over the headers; `None` when none of them reports a remaining count.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Option<Report> {
        let mut r = Report::default();
        let mut now = None;
        for (name, value) in headers {
            let name = name.as_str();
            let v = value.as_bytes();
            if let Some(rest) = name.strip_prefix("x-ratelimit-") {
                let (field, dim) = match rest.split_once('-') {
                    Some((field, "requests")) => (field, &mut r.requests),
                    Some((field, "tokens")) => (field, &mut r.tokens),
                    _ => continue,
                };
                match field {
                    "limit" => dim.limit = count(v),
                    "remaining" => dim.remaining = count(v),
                    "reset" => dim.reset = go_or_seconds(v),
                    _ => {}
                }
            } else if let Some(rest) = name.strip_prefix("anthropic-ratelimit-") {
                let (dim, field) = match rest.rsplit_once('-') {
                    Some(("requests", field)) => (&mut r.requests, field),
                    Some(("tokens", field)) => (&mut r.tokens, field),
                    _ => continue,
                };
                match field {
                    "limit" => dim.limit = count(v),
                    "remaining" => dim.remaining = count(v),
                    "reset" => {
                        let now = *now.get_or_insert_with(SystemTime::now);
                        dim.reset = parse::rfc3339_until(v, now);
                    }
                    _ => {}
                }
            }
        }
        (r.requests.remaining.is_some() || r.tokens.remaining.is_some()).then_some(r)
    }
}

fn count(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

fn go_or_seconds(v: &[u8]) -> Option<Duration> {
    parse::seconds(v).or_else(|| parse::go_duration(std::str::from_utf8(v).ok()?.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn groq_and_openai_headers() {
        let r = Report::from_headers(&headers(&[
            ("x-ratelimit-limit-requests", "14400"),
            ("x-ratelimit-limit-tokens", "18000"),
            ("x-ratelimit-remaining-requests", "14370"),
            ("x-ratelimit-remaining-tokens", "17997"),
            ("x-ratelimit-reset-requests", "2m59.56s"),
            ("x-ratelimit-reset-tokens", "7.66s"),
            ("content-type", "application/json"),
        ]))
        .unwrap();
        assert_eq!(r.requests.limit, Some(14400));
        assert_eq!(r.requests.remaining, Some(14370));
        assert_eq!(r.requests.reset, Some(Duration::from_millis(179_560)));
        assert_eq!(r.tokens.remaining, Some(17997));
        assert_eq!(r.tokens.reset, Some(Duration::from_millis(7_660)));
    }

    #[test]
    fn anthropic_headers_and_what_is_no_report() {
        let r = Report::from_headers(&headers(&[
            ("anthropic-ratelimit-requests-limit", "5"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2999-03-26T20:00:00Z"),
            ("anthropic-ratelimit-input-tokens-remaining", "100"),
        ]))
        .unwrap();
        assert_eq!(r.requests.remaining, Some(0));
        assert!(r.requests.reset.unwrap() > Duration::from_secs(86_400));
        assert_eq!(r.tokens, Window::default());
        // Azure's -1, and no remaining count at all, report nothing.
        let azure = [
            ("x-ratelimit-remaining-tokens", "-1"),
            ("x-ratelimit-limit-tokens", "-1"),
        ];
        assert_eq!(Report::from_headers(&headers(&azure)), None);
        assert_eq!(
            Report::from_headers(&headers(&[("retry-after", "2")])),
            None
        );
    }

    #[test]
    fn model_and_cost_from_json() {
        let body = br#"{"messages":[{"role":"user","content":"\"model\": \"x\""}],"model":"gemma2-9b-it","max_tokens":64,"max_completion_tokens":100}"#;
        assert_eq!(
            Bucket::from_openai_json(body),
            Some(Bucket::new("gemma2-9b-it"))
        );
        assert_eq!(
            TokenCost::estimate_openai_json(body),
            TokenCost(100 + (body.len() as u64).div_ceil(4))
        );
        // A nested "model" is not the request's.
        assert_eq!(Bucket::from_openai_json(br#"{"x":{"model":"y"}}"#), None);
        assert_eq!(Bucket::from_openai_json(b"not json"), None);
        assert_eq!(TokenCost::estimate_openai_json(b"{}"), TokenCost(1));
    }
}
