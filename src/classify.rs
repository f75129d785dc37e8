//! Telling apart what a response means for the key that was used.
//!
//! Classification runs in two steps so that success bodies are never touched:
//! [`Classify::classify_head`] sees the status and headers and either decides or asks for the
//! body; only then is a bounded prefix of the body read and passed to
//! [`Classify::classify_body`]. [`DefaultClassifier`] knows the signals of Groq, OpenAI,
//! Anthropic, Gemini, Azure OpenAI, Mistral and OpenRouter; its body patterns can be extended.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, StatusCode};

use crate::errorbody::ErrorFields;
use crate::parse;

/// What a response means for the key that was used to get it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// The key served the request. The response is handed back untouched.
    Success,
    /// The key served the request, but the provider says its allowance is used up
    /// (`x-ratelimit-remaining-requests: 0`). The response is handed back and the key cools
    /// down for `retry_after` before another request is spent on a 429.
    Drained {
        /// How long until the provider replenishes the allowance.
        retry_after: Duration,
    },
    /// A short-window rate limit (per second, minute). The key cools down for `retry_after`,
    /// or for the configured default when the provider gave no time, and the request is
    /// replayed with the next key.
    RateLimited {
        /// The provider's reset time, when it gave one.
        retry_after: Option<Duration>,
    },
    /// A daily, monthly or billing quota is used up. The key cools down for a long time (the
    /// reset time given, or the configured quota cooldown) and the request is replayed.
    QuotaExhausted {
        /// The provider's reset time, when it gave a believable one.
        retry_after: Option<Duration>,
    },
    /// The key is invalid, revoked or not allowed. It is disabled until reset or rotated,
    /// and the request is replayed with the next key.
    InvalidKey,
    /// The provider is overloaded or failing (500, 502, 503, 504, 529, Groq's 498). One error
    /// counts against the key and the request is replayed with the next key.
    ServerError,
    /// The request itself is at fault (400, 404, 413, 422, "request too large", …). It is
    /// handed back as is and no key is blamed: another key would get the same answer.
    RequestFault,
}

impl Verdict {
    /// Whether the key is at fault, so the request should be replayed with another key.
    pub fn is_key_fault(&self) -> bool {
        matches!(
            self,
            Verdict::RateLimited { .. }
                | Verdict::QuotaExhausted { .. }
                | Verdict::InvalidKey
                | Verdict::ServerError
        )
    }
}

/// What a failed call (an error instead of a response: a refused connection, a timeout)
/// means for the key that was used.
///
/// | Error | Verdict | What happens |
/// |---|---|---|
/// | connection refused, DNS failure, TLS handshake failure, unreachable host or network, a connect timeout | [`ErrorVerdict::Unreachable`] | no key is blamed and none is tried next: the caller gets the error at once |
/// | a connection the server closed or reset (a pooled connection that had gone stale) | [`ErrorVerdict::ConnectionLost`] | no key is blamed; the request is sent once more, with the next usable key |
/// | a timeout of the attempt (`tower::timeout` inside the layer), anything else | [`ErrorVerdict::KeyFailed`] | one error counts against the key (as a 5xx does) and the request moves on to the next key |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorVerdict {
    /// The upstream could not be reached at all. That is the same for every key, so no key
    /// is blamed and no other key is tried.
    Unreachable,
    /// The connection was lost in a way that says nothing about the key; worth one more try.
    ConnectionLost,
    /// The attempt failed on the key's account: counted against it, and the next key is
    /// tried.
    KeyFailed,
}

/// The default reading of a transport error, walking its chain of sources: hyper-util's
/// and reqwest's connect errors, and `std::io::Error` kinds.
pub fn classify_transport_error(error: &(dyn std::error::Error + 'static)) -> ErrorVerdict {
    use std::io::ErrorKind as K;
    let mut cur = Some(error);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                K::ConnectionRefused
                | K::AddrNotAvailable
                | K::HostUnreachable
                | K::NetworkUnreachable => return ErrorVerdict::Unreachable,
                K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                    return ErrorVerdict::ConnectionLost
                }
                K::TimedOut => return ErrorVerdict::KeyFailed,
                _ => {}
            }
        }
        // hyper-util's client (and reqwest over it) says "client error (Connect)" for every
        // failure to connect: DNS, TCP, TLS, the connect timeout. Read from the text, so that
        // this works whichever version of hyper-util the caller's client was built with.
        let text = e.to_string();
        if text == "client error (Connect)"
            || text.starts_with("dns error")
            || text.starts_with("tcp connect error")
        {
            return ErrorVerdict::Unreachable;
        }
        if text.starts_with("connection closed before message completed")
            || text == "client error (ChannelClosed)"
            || text == "client error (Canceled)"
        {
            return ErrorVerdict::ConnectionLost;
        }
        cur = e.source();
    }
    ErrorVerdict::KeyFailed
}

/// The result of looking at a response's status and headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeadVerdict {
    /// Decided from the head alone.
    Done(Verdict),
    /// Read up to the body-inspection limit of the body, then call
    /// [`Classify::classify_body`].
    InspectBody,
}

/// Decides what a response means for the key that got it.
///
/// Implement this to teach the layer another provider's signals; delegate to
/// [`DefaultClassifier`] for everything you do not handle yourself.
///
/// ```
/// use http::{HeaderMap, HeaderName, StatusCode};
/// use tower_key_fallback::{Classify, DefaultClassifier, HeadVerdict, Verdict};
///
/// /// A provider that answers 420 when a key is rate limited.
/// struct MyProvider(DefaultClassifier);
///
/// impl Classify for MyProvider {
///     fn classify_head(&self, status: StatusCode, headers: &HeaderMap) -> HeadVerdict {
///         if status.as_u16() == 420 {
///             return HeadVerdict::Done(Verdict::RateLimited { retry_after: None });
///         }
///         self.0.classify_head(status, headers)
///     }
///     fn classify_body(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Verdict {
///         self.0.classify_body(status, headers, body)
///     }
/// }
///
/// let c = MyProvider(DefaultClassifier::new());
/// let v = c.classify_head(StatusCode::from_u16(420).unwrap(), &HeaderMap::new());
/// assert_eq!(v, HeadVerdict::Done(Verdict::RateLimited { retry_after: None }));
/// ```
pub trait Classify: Send + Sync + 'static {
    /// Classifies from the status and headers, or asks for the body.
    fn classify_head(&self, status: StatusCode, headers: &HeaderMap) -> HeadVerdict;

    /// Classifies with a prefix of the body (at most the configured inspection limit).
    fn classify_body(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Verdict;

    /// Classifies a failed call. Default: [`classify_transport_error`].
    fn classify_error(&self, error: &(dyn std::error::Error + 'static)) -> ErrorVerdict {
        classify_transport_error(error)
    }
}

/// The signals of the common LLM providers, with configurable body patterns.
///
/// An error body is read for what the provider itself asserts: the structured fields of its
/// JSON error (`error.code`, `error.type`, `error.status`, google.rpc `details`, Anthropic's
/// `details.error_code`), and a message only where the provider's own message is the signal,
/// matched at its start (Anthropic's "Your credit balance is too low"). Text the provider
/// quotes from the request (OpenAI's `Invalid value: 'invalid_api_key'`, a model name) never
/// counts, so nothing a client sends can blame a key.
///
/// | Response | Verdict |
/// |---|---|
/// | 2xx with `x-ratelimit-remaining-requests` or `-tokens` (or Anthropic's `anthropic-ratelimit-*-remaining`) at `0` | [`Verdict::Drained`] until the matching reset |
/// | other 1xx/2xx/3xx | [`Verdict::Success`] |
/// | 429 `request_too_large`, or a message "Request too large for …" | [`Verdict::RequestFault`] |
/// | 429 `overloaded_error`, or a message "Service tier capacity exceeded", "The system is currently experiencing high demand", … | [`Verdict::ServerError`] |
/// | 429 with a quota code (`insufficient_quota`, `*_spend_limit_exceeded`, `enforced_spend_limit_reached`), a `…PerDay…` quota id, a daily window (`(TPD): Limit`, `(RPD): Limit`), Gemini's `limit: 0`, OpenRouter's `free-models-per-day` | [`Verdict::QuotaExhausted`] |
/// | other 429 (JSON or not) | [`Verdict::RateLimited`] |
/// | 401 | [`Verdict::InvalidKey`] |
/// | 402 | [`Verdict::QuotaExhausted`] |
/// | 403 that is not JSON (an edge's HTML or `error code: 1020`), a region refusal, `invalid_request_error`, a moderation flag | [`Verdict::RequestFault`] |
/// | other 403 | [`Verdict::InvalidKey`] |
/// | 400 with an invalid-key code (`invalid_api_key`, `organization_restricted`, Gemini's `API_KEY_INVALID`) | [`Verdict::InvalidKey`] |
/// | 400 with a quota signal (Anthropic's "Your credit balance is too low") | [`Verdict::QuotaExhausted`] |
/// | 408, 498, 500, 502, 503, 504, 529 and other 5xx but 501 and 505 | [`Verdict::ServerError`] |
/// | any other status (400, 404, 413, 422, …) | [`Verdict::RequestFault`] |
///
/// Reset times are read, in this order, from `retry-after-ms`, `retry-after` (seconds, or an
/// HTTP date; a date already past is no hint), `x-ratelimit-reset-requests` /
/// `x-ratelimit-reset-tokens` (Go durations such as `2m59.56s`), and the body: google.rpc's
/// `retryDelay`, else the last "try again in 9.54s" / "retry after 6 seconds" of the
/// provider's message. A rate limit whose reset is an hour or more away is reported as an
/// exhausted quota (Azure's "retry after 86400 seconds"). A quota's own end comes first where
/// the provider names it: a Gemini per-day quota (`quotaId` `…PerDay…`) ends at the next
/// midnight Pacific time, whatever its `retryDelay` says, and Anthropic's monthly cap ends
/// when "You will regain access on 2026-09-01 at 00:00 UTC" says. How long a key is then set aside is
/// capped by [`max_cooldown`](crate::KeyFallbackBuilder::max_cooldown).
///
/// Added patterns ([`quota_pattern`](DefaultClassifier::quota_pattern), …) are matched
/// anywhere in the body, quoted request text included: prefer a provider's code where it
/// has one.
#[derive(Debug, Clone)]
pub struct DefaultClassifier {
    /// Whether the providers' signals in error bodies are read (off after `without_patterns`).
    builtin: bool,
    /// The patterns added by the user.
    patterns: Patterns,
    long_wait_is_quota: Duration,
    /// Whether `x-should-retry` is read ([`honor_should_retry`](Self::honor_should_retry)).
    should_retry: bool,
    /// A header giving the end of the window in milliseconds since the Unix epoch
    /// (OpenRouter's `X-RateLimit-Reset`), read after the standard ones.
    reset_epoch_ms: Option<HeaderName>,
    /// Every 403 is the request's fault (Together's "input tokens + `max_tokens` exceed the
    /// context length"), never the key's.
    forbidden_is_request: bool,
}

/// What a body pattern marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Quota = 1,
    InvalidKey = 2,
    TooLarge = 4,
    Overloaded = 8,
    NotKey = 16,
}

/// Body patterns added by the user, matched ASCII case-insensitively anywhere in the body.
/// There are few (none by default), so each is a plain search, linear in the body.
#[derive(Debug, Clone, Default)]
struct Patterns(Vec<(Mark, Box<[u8]>)>);

impl Patterns {
    fn add(&mut self, mark: Mark, pattern: String) {
        if !pattern.is_empty() {
            self.0.push((mark, pattern.into_bytes().into()));
        }
    }

    /// The marks of every pattern found in `body`.
    fn scan(&self, body: &[u8]) -> u8 {
        self.0
            .iter()
            .filter(|(_, p)| parse::find_ci(body, p).is_some())
            .fold(0, |marks, (mark, _)| marks | *mark as u8)
    }
}

/// `error.code` / `error.type` values that mark an exhausted quota or billing cap (OpenAI's
/// and Anthropic's).
const QUOTA_CODES: &[&str] = &[
    "insufficient_quota",
    "credit_balance_exhausted",
    "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded",
    "organization_usage_limit_exceeded",
    "billing_error",
];

/// Provider messages that are themselves the quota signal (Anthropic's, OpenRouter's), matched
/// at the start of the message only.
const QUOTA_MESSAGES: &[&str] = &[
    "Your credit balance is too low",
    "You have reached your API usage limits",
    "You have reached your specified API usage limits",
    "Rate limit exceeded: free-models-per-day",
];

/// `error.code` / `error.type` values that mark a key the provider will not accept.
const INVALID_KEY_CODES: &[&str] = &[
    "invalid_api_key",
    "organization_restricted",
    "account_deactivated",
    "authentication_error",
];

/// Gemini's messages for a bad key (with `status: INVALID_ARGUMENT`), at the start only.
const INVALID_KEY_MESSAGES: &[&str] = &["API key not valid", "API Key not found"];

/// A 429 that is about the request's size, not the key's allowance.
const TOO_LARGE_CODES: &[&str] = &["request_too_large"];
const TOO_LARGE_MESSAGES: &[&str] = &["Request too large for"];

/// A 429 that is the provider's overload (Mistral's, Azure's), not the key's limit.
const OVERLOADED_CODES: &[&str] = &["overloaded_error", "server_is_overloaded"];
const OVERLOADED_MESSAGES: &[&str] = &[
    "Service tier capacity exceeded",
    "The system is currently experiencing high demand",
    "The model is overloaded",
    "This model is currently experiencing high demand",
    "Overloaded",
];

/// A 403 that is about the request or where it comes from, not the key.
const NOT_KEY_CODES: &[&str] = &[
    "unsupported_country_region_territory",
    "invalid_request_error",
];
const NOT_KEY_MESSAGES: &[&str] = &["Country, region, or territory not supported"];

/// What the provider's own error envelope says, read with [`ErrorFields`].
impl ErrorFields<'_> {
    fn quota(&self) -> bool {
        self.code_or_kind_in(QUOTA_CODES)
            || self.error_code == Some(b"enforced_spend_limit_reached")
            || self.per_day_quota
            || self.message_starts_with(QUOTA_MESSAGES)
            || (self.message_starts_with(&["Rate limit reached"])
                && self.message.is_some_and(daily_window))
            || (self.status == Some(b"RESOURCE_EXHAUSTED")
                && self.message.is_some_and(gemini_no_allowance))
    }

    fn invalid_key(&self) -> bool {
        self.code_or_kind_in(INVALID_KEY_CODES)
            || self.api_key_invalid
            || (self.status == Some(b"INVALID_ARGUMENT")
                && self.message_starts_with(INVALID_KEY_MESSAGES))
    }

    fn too_large(&self) -> bool {
        self.code_or_kind_in(TOO_LARGE_CODES) || self.message_starts_with(TOO_LARGE_MESSAGES)
    }

    fn overloaded(&self) -> bool {
        self.code_or_kind_in(OVERLOADED_CODES) || self.message_starts_with(OVERLOADED_MESSAGES)
    }

    /// A 403 that is not the key's fault: an edge's page (not JSON), a region refusal, a
    /// request the provider judged invalid, a moderation flag.
    fn not_key(&self) -> bool {
        !self.json
            || self.code_or_kind_in(NOT_KEY_CODES)
            || self.message_starts_with(NOT_KEY_MESSAGES)
            || self.flagged
    }
}

/// Groq's and OpenAI's rate-limit message names its window last, after the model and the
/// organization it quotes: `… on tokens per day (TPD): Limit 100000, …`. The window is the
/// abbreviation before the last `): Limit `; one ending in `D` (TPD, RPD, ASD) is daily.
fn daily_window(message: &[u8]) -> bool {
    const MARK: &[u8] = b"): Limit ";
    let Some(at) = parse::rfind(message, MARK) else {
        return false;
    };
    let before = &message[..at];
    let Some(open) = before.iter().rposition(|&b| b == b'(') else {
        return false;
    };
    let abbr = &before[open + 1..];
    (2..=4).contains(&abbr.len()) && abbr.iter().all(u8::is_ascii_uppercase) && abbr.ends_with(b"D")
}

/// Gemini's "Quota exceeded for metric: <metric>, limit: 0": the model has no allowance on
/// this tier at all. The figure is read right after the provider's metric name.
fn gemini_no_allowance(message: &[u8]) -> bool {
    const MARK: &[u8] = b"Quota exceeded for metric: ";
    let mut rest = message;
    while let Some(at) = parse::find_ci(rest, MARK) {
        rest = &rest[at + MARK.len()..];
        let metric = rest
            .iter()
            .position(|&b| b == b',' || b.is_ascii_whitespace())
            .unwrap_or(rest.len());
        if rest[metric..].starts_with(b", limit: 0,") {
            return true;
        }
    }
    false
}

impl Default for DefaultClassifier {
    fn default() -> Self {
        Self::new()
    }
}

impl DefaultClassifier {
    /// The default signals, as the table above lists them.
    pub fn new() -> Self {
        Self {
            builtin: true,
            patterns: Patterns::default(),
            long_wait_is_quota: Duration::from_secs(3600),
            should_retry: false,
            reset_epoch_ms: None,
            forbidden_is_request: false,
        }
    }

    /// Adds a body pattern (matched ASCII case-insensitively, anywhere in the body) that marks
    /// an exhausted quota on a 400, 429 or 402.
    pub fn quota_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.patterns.add(Mark::Quota, pattern.into());
        self
    }

    /// Adds a body pattern that marks an invalid or revoked key on a 400 or 429.
    pub fn invalid_key_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.patterns.add(Mark::InvalidKey, pattern.into());
        self
    }

    /// Adds a body pattern that marks a request too large for any key (never replayed).
    pub fn too_large_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.patterns.add(Mark::TooLarge, pattern.into());
        self
    }

    /// Adds a body pattern that marks a 429 as provider overload rather than the key's limit.
    pub fn overloaded_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.patterns.add(Mark::Overloaded, pattern.into());
        self
    }

    /// Adds a body pattern that marks a 403 as not the key's fault (an edge block, a region).
    pub fn not_key_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.patterns.add(Mark::NotKey, pattern.into());
        self
    }

    /// Drops every body signal, the providers' and the added patterns, keeping only the
    /// status and header rules.
    pub fn without_patterns(mut self) -> Self {
        self.builtin = false;
        self.patterns = Patterns::default();
        self
    }

    /// A rate limit whose reset is at least this far away is reported as an exhausted quota.
    /// Default: one hour.
    pub fn long_wait_is_quota(mut self, wait: Duration) -> Self {
        self.long_wait_is_quota = wait;
        self
    }

    /// Reads the `x-should-retry` header that OpenAI's, Anthropic's and Groq's APIs send
    /// (their SDKs obey it before anything else): `false` on an answer that would count as
    /// the provider's failure ([`Verdict::ServerError`]) makes it the request's own
    /// ([`Verdict::RequestFault`]: handed back, no key blamed, since the provider says
    /// sending it again fails too); `true` on an answer that its status alone makes the
    /// request's fault (a 409, a 404) makes it worth another key ([`Verdict::ServerError`]),
    /// but not where the body says what is wrong with the request ("Request too large for
    /// …", a region refusal): another key would be blamed for it. The header never changes what a
    /// rate limit, a quota or an invalid key does to the key: another key may well serve.
    /// Default: off; on in the [`Provider`](crate::Provider) presets of the APIs that send it.
    pub fn honor_should_retry(mut self, honor: bool) -> Self {
        self.should_retry = honor;
        self
    }

    /// Reads `header` as the end of the rate-limit window in milliseconds since the Unix
    /// epoch, after `retry-after` and the `x-ratelimit-reset-*` headers.
    pub(crate) fn reset_epoch_ms(mut self, header: HeaderName) -> Self {
        self.reset_epoch_ms = Some(header);
        self
    }

    /// Makes every 403 the request's fault.
    pub(crate) fn forbidden_is_request(mut self) -> Self {
        self.forbidden_is_request = true;
        self
    }

    /// `x-should-retry`, when honoured: see [`honor_should_retry`](Self::honor_should_retry).
    /// `true` makes a request's fault worth another key only when the status alone decided it
    /// (`head`): where the body says what is wrong with the request ("Request too large",
    /// a region refusal), another key gets the same answer, and would be blamed for it.
    fn should_retry(&self, headers: &HeaderMap, verdict: Verdict, head: bool) -> Verdict {
        const SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
        if !self.should_retry || !matches!(verdict, Verdict::ServerError | Verdict::RequestFault) {
            return verdict;
        }
        match (
            verdict,
            headers.get(SHOULD_RETRY).map(|v| v.as_bytes().trim_ascii()),
        ) {
            (Verdict::ServerError, Some(b"false")) => Verdict::RequestFault,
            (Verdict::RequestFault, Some(b"true")) if head => Verdict::ServerError,
            _ => verdict,
        }
    }
}

const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// Remaining-count and reset headers per dimension; the reset is RFC 3339 when `true`.
const DIMENSIONS: [(HeaderName, HeaderName, bool); 6] = [
    (
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
        false,
    ),
    (
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
        false,
    ),
    (
        HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
        HeaderName::from_static("anthropic-ratelimit-requests-reset"),
        true,
    ),
    (
        HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-tokens-reset"),
        true,
    ),
    (
        HeaderName::from_static("anthropic-ratelimit-input-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-input-tokens-reset"),
        true,
    ),
    (
        HeaderName::from_static("anthropic-ratelimit-output-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-output-tokens-reset"),
        true,
    ),
];

/// The provider's wait hint from headers only, in the documented order.
/// The wall clock, read at most once, and only when a date must be compared with it.
pub(crate) struct Now(std::cell::Cell<Option<SystemTime>>);

impl Now {
    pub(crate) fn new() -> Now {
        Now(std::cell::Cell::new(None))
    }

    pub(crate) fn get(&self) -> SystemTime {
        *self.0.get().get_or_insert_with(SystemTime::now)
    }
}

pub(crate) fn header_hint(headers: &HeaderMap, now: &Now) -> Option<Duration> {
    if let Some(v) = headers.get(&RETRY_AFTER_MS) {
        if let Some(d) = parse::millis(v.as_bytes()) {
            return Some(d);
        }
    }
    if let Some(v) = headers.get(http::header::RETRY_AFTER) {
        if let Some(d) = parse::retry_after(v.as_bytes(), || now.get()) {
            return Some(d);
        }
    }
    reset_hint(headers, now, false)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// The time until the exhausted dimension(s) reset. With `only_exhausted`, dimensions whose
/// remaining count is not zero are ignored; otherwise, when none is at zero, the soonest
/// reset is taken.
fn reset_hint(headers: &HeaderMap, now: &Now, only_exhausted: bool) -> Option<Duration> {
    let mut exhausted: Option<Duration> = None;
    let mut soonest: Option<Duration> = None;
    let mut any_exhausted = false;
    for (remaining, reset, rfc3339) in &DIMENSIONS {
        let reset = match headers.get(reset) {
            // A reset time already past says nothing about how long to wait.
            Some(v) if *rfc3339 => {
                parse::rfc3339_until(v.as_bytes(), now.get()).filter(|d| !d.is_zero())
            }
            Some(v) => v.to_str().ok().and_then(parse::go_duration),
            None => None,
        };
        let is_zero = header_str(headers, remaining) == Some("0");
        if is_zero {
            any_exhausted = true;
            if let Some(r) = reset {
                exhausted = Some(exhausted.map_or(r, |e| e.max(r)));
            }
        }
        if let Some(r) = reset {
            soonest = Some(soonest.map_or(r, |s| s.min(r)));
        }
    }
    if any_exhausted || only_exhausted {
        exhausted
    } else {
        soonest
    }
}

/// Whether any remaining-count header says the allowance is used up.
fn any_remaining_zero(headers: &HeaderMap) -> bool {
    // One pass over the headers, comparing names only where the value is "0": cheaper than a
    // lookup per name on the success path.
    headers.iter().any(|(name, value)| {
        value.as_bytes().trim_ascii() == b"0" && DIMENSIONS.iter().any(|(r, _, _)| r == name)
    })
}

impl Classify for DefaultClassifier {
    fn classify_head(&self, status: StatusCode, headers: &HeaderMap) -> HeadVerdict {
        match self.head(status, headers) {
            HeadVerdict::Done(verdict) => {
                HeadVerdict::Done(self.should_retry(headers, verdict, true))
            }
            inspect => inspect,
        }
    }

    fn classify_body(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Verdict {
        self.should_retry(headers, self.body(status, headers, body), false)
    }
}

impl DefaultClassifier {
    fn head(&self, status: StatusCode, headers: &HeaderMap) -> HeadVerdict {
        let code = status.as_u16();
        let verdict = match code {
            100..=399 => {
                if any_remaining_zero(headers) {
                    match reset_hint(headers, &Now::new(), true) {
                        Some(retry_after) if !retry_after.is_zero() => {
                            Verdict::Drained { retry_after }
                        }
                        _ => Verdict::Success,
                    }
                } else {
                    Verdict::Success
                }
            }
            400 | 402 | 403 | 429 => return HeadVerdict::InspectBody,
            401 => Verdict::InvalidKey,
            408 | 498 | 500 | 502..=504 | 506..=599 => Verdict::ServerError,
            _ => Verdict::RequestFault,
        };
        HeadVerdict::Done(verdict)
    }

    fn body(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Verdict {
        let fields = if self.builtin {
            ErrorFields::scan(body)
        } else {
            ErrorFields {
                json: matches!(body.trim_ascii_start().first(), Some(b'{' | b'[')),
                ..ErrorFields::default()
            }
        };
        let added = self.patterns.scan(body);
        let has = |mark: Mark| added & mark as u8 != 0;
        let now = Now::new();
        let hint = || {
            header_hint(headers, &now)
                .or_else(|| self.epoch_hint(headers, &now))
                .or_else(|| body_hint(&fields, body))
        };
        // A quota's own end, where the provider names it, over any shorter hint: Gemini's
        // per-day quotas end at midnight Pacific time (their `RetryInfo` says seconds), and
        // Anthropic's monthly cap says when access returns.
        let quota_hint = || {
            if fields.per_day_quota {
                return Some(parse::until_pacific_midnight(now.get()));
            }
            if fields.error_code == Some(b"enforced_spend_limit_reached")
                || fields.message_starts_with(QUOTA_MESSAGES)
            {
                if let Some(d) = fields
                    .message
                    .and_then(|m| parse::regain_access(m, now.get()))
                    .filter(|d| !d.is_zero())
                {
                    return Some(d);
                }
            }
            hint()
        };
        match status.as_u16() {
            429 => {
                if fields.too_large() || has(Mark::TooLarge) {
                    Verdict::RequestFault
                } else if fields.invalid_key() || has(Mark::InvalidKey) {
                    Verdict::InvalidKey
                } else if fields.quota() || has(Mark::Quota) {
                    Verdict::QuotaExhausted {
                        retry_after: quota_hint(),
                    }
                } else if fields.overloaded() || has(Mark::Overloaded) {
                    Verdict::ServerError
                } else {
                    match hint() {
                        Some(d) if d >= self.long_wait_is_quota => Verdict::QuotaExhausted {
                            retry_after: Some(d),
                        },
                        retry_after => Verdict::RateLimited { retry_after },
                    }
                }
            }
            402 => Verdict::QuotaExhausted {
                retry_after: hint(),
            },
            403 => {
                if self.forbidden_is_request || fields.not_key() || has(Mark::NotKey) {
                    Verdict::RequestFault
                } else {
                    Verdict::InvalidKey
                }
            }
            400 => {
                if fields.invalid_key() || has(Mark::InvalidKey) {
                    Verdict::InvalidKey
                } else if fields.quota() || has(Mark::Quota) {
                    Verdict::QuotaExhausted {
                        retry_after: quota_hint(),
                    }
                } else {
                    Verdict::RequestFault
                }
            }
            _ => match self.head(status, headers) {
                HeadVerdict::Done(v) => v,
                HeadVerdict::InspectBody => Verdict::RequestFault,
            },
        }
    }
}

impl DefaultClassifier {
    /// The end of the window from the epoch-milliseconds header, if this classifier reads one.
    fn epoch_hint(&self, headers: &HeaderMap, now: &Now) -> Option<Duration> {
        let value = headers.get(self.reset_epoch_ms.as_ref()?)?;
        parse::epoch_millis_until(value.as_bytes(), now.get())
    }
}

/// A wait hint from the body: google.rpc's `retryDelay`, else the provider's message ("Please
/// try again in 5.289s", "Please retry after 6 seconds"; the last such phrase, which comes
/// after any text the message quotes), else, for a body that is not JSON, its text.
fn body_hint(fields: &ErrorFields<'_>, body: &[u8]) -> Option<Duration> {
    if let Some(delay) = fields.retry_delay {
        if let Some(d) = std::str::from_utf8(delay).ok().and_then(parse::go_duration) {
            return Some(d);
        }
    }
    match fields.message {
        Some(message) => parse::body_hint(message),
        None if !fields.json => parse::body_hint(body),
        None => None,
    }
}
